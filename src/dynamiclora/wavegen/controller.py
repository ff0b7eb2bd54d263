"""The WaveController: the path every ``agent.generate`` takes.

Per request: snapshot → provenance per cache tier → exact lookup (deepest tier first). A hit is served by
``jump`` (the cached tokens, no model call) or ``verify`` (the cached tokens are a draft: one forward pass
scores them, the model's own prefix is kept, decoding continues from there). An exact miss prefills the
prompt once; its final hidden states give the semantic vector, the nearest cached prompt of equal
provenance (if close enough) is verified the same way, and otherwise decoding simply continues from the
prefill. A miss's trajectory is stored if coherent, in the tier its universality earns, and learned into
the agent's context tier if confident. Exact misses of a batch with no semantic candidates decode together
in one heterogeneous batch.

In the tick, entries whose hit rate reached their tier's consolidation threshold are internalized: a circuit
is trained into the matching LoRA scope until the stack up to that tier reproduces the continuation, greedy
decoding without the cache confirms it, and only then is the entry evicted. Failures are logged and kept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..config import CACHE_TIERS, TIERS, GenerationConfig
from ..dynamics.resonance import Proposal
from ..errors import ConfigError, InvalidInputError
from ..eventlog import EventLog
from ..generation import DecodeState, feed, positions, prefill, row_generators, run
from ..hierarchy import AgentInfo, ScopeKey, Snapshot
from .cache import CacheEntry, TieredCache
from .extraction import ExtractedCircuit, default_chain, extract
from .observe import Recorder, Trajectory
from .signature import prompt_key, provenance, rank_pattern_hash, sampling_key
from .speculative import accept

if TYPE_CHECKING:
    from ..agent import GenerationResult
    from ..dynamics import Memory
    from ..learning import ContextLearner
    from ..runtime import Runtime


@dataclass
class _Request:
    row: int
    agent_id: str
    info: AgentInfo
    prompt: str
    ids: list[int]
    snapshot: Snapshot
    provenances: dict[str, str]
    key: str
    sampling: str
    entry: CacheEntry | None
    started: float
    acting: int  # index in TIERS of the fastest tier with a circuit that acts on this prompt (-1: none)


def scope_of(tier: str, info: AgentInfo) -> ScopeKey:
    """The LoRA scope a cache tier's entries of this agent are internalized into."""
    return {k.tier: k for k in info.stack()}[tier]


class WaveController:
    def __init__(self, runtime: Runtime, learner: ContextLearner, memory: Memory) -> None:
        self.rt, self.learner, self.memory = runtime, learner, memory
        self.config = runtime.config.wavegen
        self.cache = TieredCache(self.config)
        self.log = EventLog()  # consolidation attempts, successes and failures
        self.chain = default_chain({n: (m.in_features, m.out_features) for n, m in runtime.layers.items()})

    # -- generation ---------------------------------------------------------------------------------
    def generate_batch(
        self,
        requests: Sequence[tuple[str, str]],
        generation: GenerationConfig | None = None,
        mode: str | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate for (agent id, prompt) pairs through the cache. ``mode``: 'verify' or 'jump' (default: config)."""
        rt = self.rt
        cfg = replace(generation or rt.config.generation, **overrides)
        mode = mode or self.config.mode
        if mode not in ("verify", "jump"):
            raise ConfigError(f"mode must be 'verify' or 'jump', got {mode!r}")
        sampling = sampling_key(cfg)
        self.cache.sync(rt.hierarchy)
        results: list[GenerationResult | None] = [None] * len(requests)
        batched: list[_Request] = []
        for row, (agent_id, prompt) in enumerate(requests):
            req = self.open(row, agent_id, prompt, cfg, sampling)
            results[row] = self.serve(req, cfg, mode)
            if results[row] is None:
                batched.append(req)
        if batched:
            for req, result in zip(batched, self._decode_misses(batched, cfg)):
                results[req.row] = result
        return results  # type: ignore[return-value]

    def open(self, row: int, agent_id: str, prompt: str | Sequence[int], cfg: GenerationConfig, sampling: str):
        """A request's snapshot, provenances and exact lookup (it counts as a request of its prompt)."""
        rt = self.rt
        started = time.perf_counter()
        info = rt.hierarchy.agent(agent_id)
        prompt, ids = rt.prompt_text_and_ids(prompt)
        if not ids:
            raise InvalidInputError("the prompt is empty after tokenization; give at least one token of text")
        rt.check_length(len(ids) + cfg.max_new_tokens, len(ids), cfg.max_new_tokens)
        snap = rt.snapshot(agent_id)
        provs = {t: provenance(snap, t, sampling) for t in CACHE_TIERS}
        key = prompt_key(ids)
        self.cache.record_request(key, info)
        entry = self.cache.lookup(key, provs)
        return _Request(
            row,
            agent_id,
            info,
            prompt,
            ids,
            snap,
            provs,
            key,
            sampling,
            entry,
            started,
            self._fastest_acting(agent_id, ids),
        )

    def serve(self, req: _Request, cfg: GenerationConfig, mode: str) -> GenerationResult | None:
        """A hit (jumped, or verified as a draft) or a semantic candidate, served now; None for a plain miss, which
        the caller decodes (in a batch) and closes with :meth:`close_miss`."""
        if req.entry is not None and mode == "jump" and self._jumpable(req, cfg):
            return self._jump(req, cfg)
        if req.entry is not None or (self.config.semantic_lookup and self.cache.has_semantic(req.provenances)):
            return self._speculate(req, cfg)
        return None

    def close_miss(
        self,
        req: _Request,
        tokens: list[int],
        traj: Trajectory,
        vector: torch.Tensor,
        touched: dict[str, float],
        timings: dict[str, float],
    ) -> GenerationResult:
        """A decoded miss: its result, and its trajectory stored (and learned, if configured)."""
        self.cache.miss()
        result = self._result(
            req, tokens, cache="miss", coherence=traj.coherence(), circuits_touched=touched, timings=dict(timings)
        )
        self._after_miss(req, tokens, traj, vector)
        return result

    def _result(self, req: _Request, tokens: list[int], **fields: Any) -> GenerationResult:
        from ..agent import GenerationResult

        eos = self.rt.tokenizer.eos_token_id
        fields.setdefault("timings", {})["total_s"] = time.perf_counter() - req.started
        return GenerationResult(
            req.agent_id,
            req.prompt,
            self.rt.tokenizer.decode(tokens, skip_special_tokens=True),
            tokens,
            bool(eos is not None and tokens and tokens[-1] == eos),
            req.snapshot.provenance_hash,
            **fields,
        )

    def _fastest_acting(self, agent_id: str, ids: list[int]) -> int:
        """Index in TIERS of the fastest tier of the agent's stack holding a circuit that acts on this prompt (a
        gated circuit it reaches, or any ungated one); -1 when none does."""
        skip = self.rt.route([agent_id], [ids])
        left_out = skip[0] if skip is not None else frozenset()
        acting = [
            TIERS.index(scope.key.tier)
            for scope in self.rt.hierarchy.stack_scopes(agent_id)
            if any(cid not in left_out for cid in scope.circuits)
        ]
        return max(acting, default=-1)

    def _jumpable(self, req: _Request, cfg: GenerationConfig) -> bool:
        """May the hit be served without running the model, exactly? Its entry holds what the stack up to its tier
        produces (greedily); that is this request's output when no faster tier of the stack acts on the prompt."""
        e = req.entry
        return cfg.temperature == 0 and e.exact and req.acting <= TIERS.index(e.tier) and self._complete(e, cfg)

    def _complete(self, e: CacheEntry, cfg: GenerationConfig) -> bool:
        """Does the entry answer the whole request (enough tokens, or it stopped on EOS)? Else verify extends it."""
        eos = self.rt.tokenizer.eos_token_id
        return len(e.tokens) >= cfg.max_new_tokens or (cfg.stop_at_eos and eos is not None and e.tokens[-1] == eos)

    def _jump(self, req: _Request, cfg: GenerationConfig) -> GenerationResult:
        e = req.entry
        tokens = e.tokens[: cfg.max_new_tokens]
        self._used(e)
        return self._result(
            req, tokens, cache=e.tier, draft_tokens=len(tokens), accepted_tokens=len(tokens), jumped=True
        )

    def _speculate(self, req: _Request, cfg: GenerationConfig) -> GenerationResult:
        """One row: prefill, find a draft (exact or semantic), verify it, continue decoding."""
        rt = self.rt
        plan = rt.planner.plan([req.agent_id], skip=rt.route([req.agent_id], [req.ids]))
        rt.use_routes(plan)
        session = rt.new_session(plan)
        pooled: list[torch.Tensor] = []
        recorder = Recorder([req.ids], self.config.observe_top_k)
        forward = rt.decoder_forward(session, True, pooled)
        entry, served = req.entry, "miss"
        drafted = accepted = 0
        generators = row_generators(cfg, 1, rt.generator)
        generator = generators[0] if generators else None
        with torch.no_grad(), rt.activate(plan, session):
            state = prefill(forward, [req.ids], pad_id=rt.pad_id, device=rt.device)
            vector = pooled[0][0].cpu()
            if entry is None:
                found = self.cache.lookup_semantic(vector, req.provenances, self.config.semantic_threshold)
                if found is not None:
                    entry = found[0]
                    self.cache.semantic_hit(entry)
                else:
                    self.cache.miss()
            if entry is not None:
                served = entry.tier if req.entry is not None else f"semantic:{entry.tier}"
                draft = entry.tokens[: cfg.max_new_tokens]
                drafted, accepted = len(draft), self._verify(forward, state, draft, cfg, recorder, generator)
                self.cache.served_draft(entry, drafted, accepted, semantic=req.entry is None)
            if not bool(state.done.all()):
                run(
                    forward,
                    state,
                    cfg,
                    pad_id=rt.pad_id,
                    eos_id=rt.tokenizer.eos_token_id,
                    generator=generator,
                    observer=recorder,
                )
        acts = rt.record_usage(plan, session)
        touched = {plan.circuits[c].id: acts[0][c] for c in plan.row_columns[0]}
        tokens, traj = state.out[0], recorder.trajectories[0]
        result = self._result(
            req,
            tokens,
            cache=served,
            draft_tokens=drafted,
            accepted_tokens=accepted,
            coherence=traj.coherence(),
            circuits_touched=touched,
        )
        if req.entry is not None:
            self._used(req.entry)
            e, exact = req.entry, req.acting <= TIERS.index(req.entry.tier)  # the output is what e.tier says
            if accepted == drafted and exact and cfg.temperature == 0:
                e.exact = True  # (a draft of the agent whose context no longer acts on it)
            # the stack says something else now: keep what it says, unless that would make an exact entry a draft
            if accepted < drafted and (exact or not e.exact) and traj.coherence() >= self.config.min_coherence:
                e.tokens, e.exact = list(tokens), exact
                e.text = rt.tokenizer.decode(tokens, skip_special_tokens=True)
        else:
            self._after_miss(req, tokens, traj, vector)
        return result

    def _verify(
        self, forward, state: DecodeState, draft: list[int], cfg: GenerationConfig, recorder: Recorder, generator
    ) -> int:
        """Score the draft in one pass, keep the accepted prefix (+ the model's next token); returns accepted."""
        eos = self.rt.tokenizer.eos_token_id
        n = len(draft)
        if n == 0:
            return 0
        mask = torch.cat([state.mask, state.mask.new_ones(1, n)], 1)
        d = torch.tensor([draft], device=state.ids.device)
        logits, past = forward(d, mask, positions(mask)[:, -n:], state.past, keep=n)
        rows = torch.cat([state.logits, logits.reshape(n, -1)], 0)  # (n + 1, V)
        k, nxt = accept(rows, draft, cfg, generator)
        tokens = draft if k == n and n >= cfg.max_new_tokens else draft[:k] + [nxt]
        if cfg.stop_at_eos and eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        for i, t in enumerate(tokens):
            recorder(rows[i : i + 1], torch.tensor([t], device=rows.device), torch.ones(1, dtype=torch.bool))
        fed = min(k, len(tokens))  # draft tokens that stay in the KV cache
        if n > fed:
            past.crop(-(n - fed))
        state.mask = mask[:, : state.ids.shape[1] + fed]
        state.ids = torch.cat([state.ids, d[:, :fed]], 1)
        state.past = past
        state.out = [list(tokens)]
        finished = cfg.stop_at_eos and eos is not None and tokens[-1] == eos
        if finished or len(tokens) >= cfg.max_new_tokens:
            state.done[:] = True
        elif len(tokens) > fed:  # the model's own next token is not in the cache yet
            feed(forward, state, torch.tensor([tokens[-1]], device=state.ids.device))
        return fed

    def _decode_misses(self, reqs: list[_Request], cfg: GenerationConfig) -> list[GenerationResult]:
        """Exact misses without semantic candidates: one heterogeneous batch."""
        recorder = Recorder([r.ids for r in reqs], self.config.observe_top_k)
        pooled: list[torch.Tensor] = []
        decoded, touched, timings = self.rt.generate_ids(
            [r.agent_id for r in reqs], [r.ids for r in reqs], cfg, observer=recorder, pooled=pooled, interaction=True
        )
        vectors = pooled[0].cpu()
        return [
            self.close_miss(req, decoded.tokens[row], recorder.trajectories[row], vectors[row], touched[row], timings)
            for row, req in enumerate(reqs)
        ]

    def _after_miss(self, req: _Request, tokens: list[int], traj: Trajectory, vector: torch.Tensor) -> None:
        """Store a coherent trajectory (tier by universality); learn it into the context tier if confident."""
        cfg, rt = self.config, self.rt
        coherence = traj.coherence()
        entry, (tier, exact) = None, self._store_tier(req)
        if tokens and coherence >= cfg.min_coherence:
            entry = CacheEntry(
                tier=tier,
                prompt_key=req.key,
                provenance=req.provenances[tier],
                prompt_ids=list(req.ids),
                tokens=list(tokens),
                text=rt.tokenizer.decode(tokens, skip_special_tokens=True),
                agent=req.agent_id,
                swarm=req.info.swarm,
                domain=req.info.domain,
                sampling=req.sampling,
                syntactic=rank_pattern_hash(traj.rank_pattern()),
                coherence=coherence,
                vector=vector,
                exact=exact,
            )
            self.cache.store(entry)
        if cfg.learn_from_generations and tokens and coherence >= cfg.learn_min_coherence:
            learned = self.learner.learn(req.agent_id, list(req.ids), list(tokens), critical=False)
            if entry is not None:
                entry.circuit_ids.append(learned.circuit_id)

    def _store_tier(self, req: _Request) -> tuple[str, bool]:
        """The cache tier a miss's output is stored in (the one its universality earns), and whether it is exact
        there: what the stack up to that tier produces, which holds when no faster tier of the stack acts on the
        prompt. An inexact entry is a draft: only verification serves it, and only a requester whose own stack
        agrees with it counts a hit (the signal that a pattern is shared, see :meth:`consolidate`)."""
        tier = self.cache.store_tier(req.key, req.info)
        return tier, req.acting <= TIERS.index(tier)

    def _used(self, e: CacheEntry) -> None:
        """A hit is a use of the circuits that learned the entry's continuation (wherever they live now)."""
        for cid in e.circuit_ids:
            with contextlib.suppress(KeyError):
                self.memory.record_use(self.rt.hierarchy.find_circuit(cid)[1])

    # -- consolidation ------------------------------------------------------------------------------
    def due(self) -> list[CacheEntry]:
        """Entries whose hit rate reached their tier's threshold with enough lookups, best first per tier."""
        out = []
        for tier in self.cache.tiers.values():
            ready = [
                e
                for e in tier.entries.values()
                if e.lookups >= max(self.config.min_lookups, e.retry_after) and e.hit_rate >= tier.threshold
            ]
            ready.sort(key=lambda e: (-e.hit_rate, -e.lookups, e.created))
            out.extend(ready[: self.rt.config.dynamics.bandwidth])
        return out

    def consolidate(self) -> list[dict[str, Any]]:
        """The tick's cache step: internalize every due entry (at most ``bandwidth`` per tier)."""
        return [self.internalize(e) for e in self.due()]

    def internalize(self, e: CacheEntry) -> dict[str, Any]:
        """Train the entry's continuation into its tier's LoRA scope; evict it only once the model produces it."""
        rt = self.rt
        record = {
            "entry": e.id,
            "tier": e.tier,
            "agent": e.agent,
            "tick": rt.clock.tick,
            "hit_rate": round(e.hit_rate, 4),
            "lookups": e.lookups,
            "text": e.text[:60],
        }
        if e.agent not in rt.hierarchy.agents:
            self.cache.evict(e)
            record.update(outcome="dropped", reason=f"agent {e.agent!r} is no longer registered")
            self.log.append(record)
            return record
        info = rt.hierarchy.agent(e.agent)
        target = scope_of(e.tier, info)
        without = TIERS[TIERS.index(e.tier) + 1 :]
        record["scope"] = str(target)
        if self.produces(e, without):
            record.update(outcome="already", reason="the stack up to this tier already produces it")
        else:
            circuit, steps, ok = self.learner.internalize(
                e.agent, e.prompt_ids, e.tokens, without, self.config.internalize_steps, self.config.internalize_lr
            )
            record["steps"] = steps
            if not ok:
                record.update(outcome="failed", reason=f"not reproduced after {steps} steps")
            elif target.tier != "agent":  # shared scopes change only by consensus: propose it for the next tick
                self._describe(e, circuit, record)
                self._propose(e, circuit, target, record)
            else:
                self._describe(e, circuit, record)
                rt.place(target, circuit)
                if self.produces(e, without):
                    extracted = self.extract(e.agent, e.prompt_ids, e.tokens, without)
                    circuit.extracted = extracted.summary()
                    record.update(outcome="internalized", circuit=circuit.id, neurons=len(extracted))
                    entry = {
                        "circuit": circuit.id,
                        "from": f"cache:{e.tier}",
                        "to": str(target),
                        "tick": rt.clock.tick,
                        "label": circuit.label,
                        "critical": False,
                        "score": record["hit_rate"],
                        "coverage": None,
                        "autocorrelation": None,
                        "kind": "consolidation",
                    }
                    self.memory.migrations.append(entry)
                else:
                    rt.hierarchy.scope(target).remove(circuit.id)
                    record.update(outcome="failed", reason="teacher forcing agreed but greedy decoding did not")
        if record["outcome"] in ("already", "internalized"):
            self.cache.evict(e)
            self.cache.tiers[e.tier].stats["consolidated"] += 1
        elif record["outcome"] == "proposed":  # checked again (and evicted) once the consensus has placed it
            e.retry_after = e.lookups + 1
        else:
            e.failures += 1
            e.retry_after = e.lookups + self.config.min_lookups  # try again after that many more lookups
        if record["outcome"] not in ("already", "internalized"):
            self.cache.mark(e)  # its retry schedule changed
        self.log.append(record)
        return record

    def _describe(self, e: CacheEntry, circuit, record: dict[str, Any]) -> None:
        """Label an internalized circuit with its entry, the agents that asked for it, and its origin."""
        circuit.observe_example(1.0, self.rt.readable(e.prompt_ids), e.text)
        circuit.origin_agents = sorted({r[0] for r in self.cache.requesters.get(e.prompt_key, [])} | {e.agent})
        circuit.history.append(
            {
                "event": "consolidated",
                "from": f"cache:{e.tier}",
                "tick": self.rt.clock.tick,
                "hit_rate": record["hit_rate"],
                "lookups": e.lookups,
            }
        )

    def _propose(self, e: CacheEntry, circuit, target: ScopeKey, record: dict[str, Any]) -> None:
        """Offer an internalized shared-tier entry to the consensus. The requesters are its contributors: at the
        swarm tier the agents that asked for it, at the domain tier their swarms, at the foundation their domains."""
        level = {"swarm": 0, "domain": 1, "foundation": 2}[target.tier]
        contributors = frozenset(r[level] for r in self.cache.requesters.get(e.prompt_key, [])) | {
            (e.agent, e.swarm, e.domain)[level]
        }
        self.memory.sharing.propose(Proposal(circuit, contributors, "", e.hit_rate, False, str(target)))
        record.update(outcome="proposed", circuit=circuit.id, contributors=sorted(contributors))

    def produces(self, e: CacheEntry, without: tuple[str, ...]) -> bool:
        """Does the agent's stack without ``without`` produce the entry's continuation, greedily and uncached?"""
        cfg = GenerationConfig(max_new_tokens=max(len(e.tokens), 1))
        decoded, _, _ = self.rt.generate_ids([e.agent], [e.prompt_ids], cfg, without=without)
        return decoded.tokens[0] == e.tokens

    # -- extraction ---------------------------------------------------------------------------------
    def extract(
        self, agent_id: str, prompt_ids: list[int], tokens: list[int], without: tuple[str, ...] = ()
    ) -> ExtractedCircuit:
        """The circuit (active neurons and strong edges along the MLP chain) behind a continuation."""
        rt = self.rt
        if not self.chain or not tokens:
            return ExtractedCircuit()
        plan = rt.planner.plan([agent_id], without=without, skip=rt.route([agent_id], [prompt_ids]))
        session = rt.new_session(plan, observe=False, capture=True)  # keeps every adapted module's input
        with torch.no_grad(), rt.activate(plan, session):
            rt.model(input_ids=torch.tensor([prompt_ids + tokens], device=rt.device), use_cache=False)
        steps = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tokens))  # the positions that chose `tokens`
        captured = {name: session.capture[name][0, steps].float() for name in self.chain}
        weights = {name: rt.layers[name].base_weight().detach() for name in self.chain}
        return extract(
            captured, weights, self.chain, self.config.extraction_weight_threshold, self.config.extraction_min_size
        )

    # -- reporting ----------------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        stats = self.cache.statistics()
        stats["consolidations"] = {
            outcome: sum(r["outcome"] == outcome for r in self.log)
            for outcome in ("internalized", "proposed", "already", "failed")
        }
        return stats
