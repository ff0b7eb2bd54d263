"""Online learning into the context tier: attribution, spawning, and gradient steps.

Only the agent's context circuits receive gradients. An interaction is attributed to the context
circuit that matches it best, if that match reaches ``LearningConfig.attribution_threshold``; otherwise a
new circuit is spawned. With routing on (the default) a context circuit is gated and matched by the distance
of the prompt to the prompts it learned from (see routing.py); an ungated circuit by its key activation
(see keys.py). A learn step trains on the interaction, the learner's own variants of it and, with subject
locality on, a text about the fact's subject that the circuit must leave alone (see subject.py).
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .circuits import Circuit
from .config import TIERS
from .gates import Gate
from .keys import background_bases, init_factors, joined_bases, key_activations, screened_bases
from .routing import first_kept
from .subject import SubjectText, subject_text

if TYPE_CHECKING:
    from .runtime import Runtime

# a gate distance this small is an exact match (rounding of a unit vector's cosine with itself, over a prototype's
# 1 - threshold of at least 0.005): the input has the very token states the keys were taken from
EXACT = 1e-3
# route features of remembered prompts a learner keeps (see ContextLearner._states): about 9,000 prompts of SmolLM2,
# 1,300 of a model 4,096 wide; beyond it each new circuit computes the features of the prompts it checks again
PROMPT_STATES_BYTES = 256 * 2**20


def _example(prompt_ids: list[int], completion_ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of one sequence: the completion's tokens are the targets."""
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    labels = ids.clone()
    labels[:, : len(prompt_ids)] = -100
    return ids, labels


@dataclass
class LearnResult:
    circuit_id: str
    spawned: bool
    activation: float  # attribution activation of the chosen circuit before the update (0 when spawned)
    loss_before: float
    loss_after: float
    dropped: str | None = None  # id of a circuit dropped to make room
    trained: bool = True  # False: a higher tier already knows the pattern; the use was recorded, nothing learned


class ContextLearner:
    """Keeps one Adam optimizer per context circuit; nothing above the context tier is ever optimized."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.on_use: Callable[[Circuit], None] = lambda circuit: None  # an input matched this circuit
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._background: dict[str, torch.Tensor] | None = None
        self._continuations: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()  # (see subject.py)
        self._prompt_states: OrderedDict[str, torch.Tensor] = OrderedDict()  # (see _states)
        self._prompt_states_bytes = 0

    def forget(self, circuit_id: str) -> None:
        self._optimizers.pop(circuit_id, None)

    def _texts(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[str, str]:
        return self.rt.readable(prompt_ids), self.rt.tokenizer.decode(completion_ids, skip_special_tokens=True)

    def _params(self, c: Circuit) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the circuit's trainable factors, in a stable order."""
        train_a = self.rt.config.learning.train_a
        return [(f"{m}/{w}", t) for m in sorted(c.factors) for w, t in zip("AB", c.factors[m]) if w == "B" or train_a]

    def _optimizer(self, c: Circuit) -> torch.optim.Optimizer:
        if c.id not in self._optimizers:
            self._optimizers[c.id] = torch.optim.Adam(
                [t for _, t in self._params(c)], lr=self.rt.config.learning.learning_rate
            )
        return self._optimizers[c.id]

    def state_tensors(self, circuits: list[Circuit]) -> dict[str, torch.Tensor]:
        """Adam moments of these (context) circuits, by circuit/module/factor/statistic, for persistence."""
        out = {}
        for c in circuits:
            opt = self._optimizers.get(c.id)
            if opt is None:
                continue
            for name, t in self._params(c):
                for stat, value in opt.state.get(t, {}).items():
                    out[f"{c.id}/{name}/{stat}"] = value.detach().float().cpu().reshape(-1).contiguous()
        return out

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        by_circuit: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            cid, rest = key.split("/", 1)
            by_circuit.setdefault(cid, {})[rest] = value
        for cid, saved in by_circuit.items():
            try:
                _, c = self.rt.hierarchy.find_circuit(cid)
            except KeyError:
                continue
            opt = self._optimizer(c)
            for name, t in self._params(c):
                stats = {k.rsplit("/", 1)[1]: v for k, v in saved.items() if k.rsplit("/", 1)[0] == name}
                if stats:
                    opt.state[t] = {
                        k: (v.reshape(()) if k == "step" else v.reshape(t.shape).to(t.device))
                        for k, v in stats.items()
                    }

    def _loss(
        self, agent_id: str, ids: torch.Tensor, labels: torch.Tensor, trainable: bool, skip=None
    ) -> torch.Tensor:
        return self._forward(agent_id, ids, labels, trainable, skip).loss

    def _forward(self, agent_id: str, ids: torch.Tensor, labels: torch.Tensor, trainable: bool, skip=None):
        rt = self.rt
        plan = rt.planner.plan([agent_id], trainable=trainable, skip=skip)
        with rt.activate(plan, rt.new_session(plan, observe=False)):
            return rt.model(input_ids=ids, labels=labels, use_cache=False)

    def _still_known(self, agent_id: str, known: Circuit, ids: torch.Tensor, labels: torch.Tensor, skip) -> tuple:
        """Does the stack still know the completion a slower circuit claims? It does when it reproduces it (every
        teacher-forced argmax is the target), or when its loss has not risen well above the loss the circuit had
        when it was last learned. A circuit that was never learned here (a consensus, a residual) has no such loss:
        only reproduction counts for it. Returns (known, loss)."""
        with torch.no_grad():
            out = self._forward(agent_id, ids, labels, False, skip)
        loss = float(out.loss)
        start = int((labels[0] != -100).nonzero()[0])
        reproduced = bool(torch.equal(out.logits[0, start - 1 : -1].argmax(-1), ids[0, start:]))
        last = known.last_loss
        return reproduced or (last is not None and loss <= max(1.2 * last, last + 0.1)), loss

    def _capture_base(self, agent_id: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each module's input under the *base model*.

        Nothing learned ever changes these inputs, so a circuit's key (made from them) keeps matching its own
        pattern however much its B has learned and wherever it migrates; under the stack, a circuit's own output
        would shift deeper layers' inputs, and every key would drift towards matching everything.
        """
        rt = self.rt
        plan = rt.planner.plan([agent_id], without=TIERS)
        session = rt.new_session(plan, observe=False, capture=True)
        with torch.no_grad(), rt.activate(plan, session):
            rt.model(input_ids=ids, use_cache=False)
        return session.capture

    def _spawn(
        self, agent_id: str, capture: dict[str, torch.Tensor], protect_from: list[Circuit]
    ) -> tuple[Circuit, str | None]:
        """A new context circuit keyed on these inputs (off the span of the SCREENED keys among ``protect_from``);
        drops the weakest if full."""
        rt, cfg = self.rt, self.rt.config.learning
        scope = rt.hierarchy.scope(("context", agent_id))
        dropped = None
        if len(scope) >= cfg.context_capacity:  # make room: the weakest FREE circuit goes first
            weakest = min(
                scope.circuits.values(),
                key=lambda c: (c.critical, c.phase == "SCREENED", c.vigor, c.u, c.updated_tick),
            )
            dropped = weakest.id
            scope.remove(weakest.id)
            self.forget(weakest.id)
        protected = screened_bases(protect_from) if rt.config.dynamics.protect_screened else {}
        circuit = self._keyed_circuit(capture, agent_id, "context", agent_id, protected)
        rt.place(scope.key, circuit)
        return circuit, dropped

    def _keyed_circuit(
        self,
        capture: dict[str, torch.Tensor],
        agent_id: str,
        tier: str,
        scope: str,
        protected: dict[str, torch.Tensor] | None = None,
    ) -> Circuit:
        """A new circuit (in no scope yet) keyed on these base-model inputs: explained-variance A (off the subspaces
        in ``protected`` and, with ``key_background``, off the background), B = 0."""
        rt = self.rt
        background = rt.config.learning.key_background > 0
        if background:
            protected = joined_bases(self._background_bases(agent_id), protected or {})
        factors = init_factors(
            {n: capture[n] for n in rt.circuit_modules},
            {n: layer.out_features for n, layer in rt.layers.items()},
            rt.config.adapter.circuit_rank,
            rt.config.learning.init_from_activations,
            rt.generator,
            protected or None,
            rescale=background,
        )
        factors = {n: (a.to(rt.device), b.to(rt.device)) for n, (a, b) in factors.items()}
        circuit = Circuit(factors=factors, tier=tier, scope=scope, created_tick=rt.clock.tick)
        circuit.key_self = key_activations([circuit], capture)[0]
        return circuit

    def _background_bases(self, agent_id: str) -> dict[str, torch.Tensor]:
        """Per circuit module, the top ``key_background`` principal directions of the reference prompts' inputs
        under the base model, their first (sink) tokens left out as a token gate leaves them out
        (``routing.first_kept``): a constant of the base model, computed once."""
        if self._background is None:
            states: dict[str, list[torch.Tensor]] = {}
            for ids in self.rt.router.reference_ids():
                capture = self._capture_base(agent_id, torch.tensor([ids], device=self.rt.device))
                for n in self.rt.circuit_modules:
                    states.setdefault(n, []).append(capture[n][0, first_kept(0, len(ids)) :].float().cpu())
            inputs = {n: torch.cat(xs) for n, xs in states.items()}
            self._background = background_bases(inputs, self.rt.config.learning.key_background)
        return self._background

    def _train(
        self,
        agent_id: str,
        circuit: Circuit,
        examples: list[tuple[torch.Tensor, torch.Tensor]],
        skip=None,
        subject: SubjectText | None = None,
    ) -> float:
        """``steps_per_learn`` Adam steps on the circuit's trainable factors (damped if SCREENED), each on the mean
        loss of ``examples`` (ids, labels): the interaction and the learner's own variants of it, plus, given an
        ``subject`` text (see subject.py), ``subject_locality`` × the mean KL divergence there from the
        stack without the circuit; returns the interaction's first loss."""
        cfg = self.rt.config.learning
        params = [t for _, t in self._params(circuit)]
        opt = self._optimizer(circuit)
        damping = self.rt.config.dynamics.screened_damping if circuit.phase == "SCREENED" else 1.0
        for group in opt.param_groups:
            group["lr"] = cfg.learning_rate * damping
        for t in params:
            t.requires_grad_(True)
        first = None
        try:
            for _ in range(cfg.steps_per_learn):
                losses, kl = self._step_losses(agent_id, examples, skip, subject)
                first = float(losses[0].detach()) if first is None else first
                loss = sum(losses) / len(losses)
                if kl is not None:
                    loss = loss + cfg.subject_locality * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
        finally:
            for t in params:
                t.requires_grad_(False)
                t.grad = None
        self.rt.hierarchy.scope(("context", agent_id)).touch()
        return first

    def _step_losses(
        self, agent_id: str, examples, skip, subject: SubjectText | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One forward of the examples (and the subject text) as rows of a batch: each example's loss on its
        labels, and the subject text's mean KL divergence from its reference (None without one). Rows are
        right-padded: a causal model's positions never see what follows them, so each row's outputs are its own."""
        rt = self.rt
        rows = [ids[0] for ids, _ in examples] + ([subject.ids[0]] if subject is not None else [])
        batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=rt.device)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
        # only the positions a loss reads get logits (the vocabulary projection is most of a small model's step)
        keep = torch.zeros(batch.shape, dtype=torch.bool, device=rt.device)
        targets = []
        for i, (_, labels) in enumerate(examples):
            scored = labels[0, 1:] != -100
            keep[i, : scored.shape[0]] = scored
            targets.append(labels[0, 1:][scored])
        if subject is not None:
            keep[-1, : subject.ids.shape[1]] = True
        own = skip[0] if skip else frozenset()
        skips = (own,) * len(examples) + ((subject.routes,) if subject is not None else ())
        plan = rt.planner.plan([agent_id] * len(rows), trainable=True, skip=skips)
        with rt.activate(plan, rt.new_session(plan, observe=False)):
            if self._keeps_logits:
                logits = rt.model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits.float()
            else:
                logits = rt.model(input_ids=batch, use_cache=False).logits.float()[keep]
        pieces = logits.reshape(-1, logits.shape[-1]).split(keep.sum(1).tolist())
        losses = [torch.nn.functional.cross_entropy(p, t) for p, t in zip(pieces, targets)]
        if subject is None:
            return losses, None
        log_q = torch.log_softmax(pieces[-1], -1)
        return losses, torch.nn.functional.kl_div(log_q, subject.reference[0], log_target=True, reduction="batchmean")

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        """Whether the model computes logits for chosen positions only (Transformers' ``logits_to_keep``)."""
        return "logits_to_keep" in inspect.signature(self.rt.model.forward).parameters

    def _variants(self, prompt_ids: list[int], completion_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The learner's own rewrites of the interaction (``LearningConfig.learn_variants``), as (ids, labels): a
        plain-text prompt as a user's message through the chat template, or in lower case, answered by the
        completion."""
        rt = self.rt
        out = []
        variants = rt.config.learning.learn_variants
        plain = rt.chat.content_span(prompt_ids) == (0, len(prompt_ids))
        if "lower" in variants:  # (none for a conversation, or a prompt lower case leaves as it is)
            lowered = rt.router.rewrites(prompt_ids, (str.lower,))
            out += [_example(ids, completion_ids, rt.device) for ids in lowered]
        if "chat" in variants and plain and getattr(rt.tokenizer, "chat_template", None):
            eos = rt.tokenizer.eos_token_id
            body = [t for t in completion_ids if t != eos]
            reply = rt.tokenizer.decode(body, skip_special_tokens=True).strip()
            question = rt.tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
            if reply and question:
                chat = rt.chat_ids([{"role": "user", "content": question}])
                answer = rt.encode(reply, special=False) + ([eos] if eos is not None else [])
                out.append(_example(chat, answer, rt.device))
        return out

    @staticmethod
    def _another_fact(circuit: Circuit, prompt: str, completion: str) -> bool:
        """Does this prompt, which reaches ``circuit``, teach something else than the circuit holds? Yes when it is
        none of the circuit's remembered prompts and none of its remembered examples has this completion. (Not
        the gate's distance: a look-alike whose distinctive tokens lie in a prefix it shares with a taught prompt,
        ``get_zephyr_port`` beside ``get_zephyr_bucket``, matches that prompt's keys exactly.)"""
        if circuit.gate is None or not circuit.gate.tokens or not circuit.examples:
            return False
        if any(e[1] == prompt for e in circuit.examples):
            return False
        return not any(e[2] == completion for e in circuit.examples)

    def _states(self, prompt: str) -> torch.Tensor:
        """The route feature of a circuit's remembered prompt, from its text (as saved, so a reloaded learner
        decides as this one would), kept for the next look-up."""
        states = self._prompt_states.pop(prompt, None)
        if states is None:
            states = self.rt.router.features([self.rt.encode(prompt)])[0]
            self._prompt_states_bytes += states.nbytes
        self._prompt_states[prompt] = states
        while self._prompt_states_bytes > PROMPT_STATES_BYTES and len(self._prompt_states) > 1:
            self._prompt_states_bytes -= self._prompt_states.popitem(last=False)[1].nbytes
        return states

    def _reached_prompts(self, gate: Gate, circuits: list[Circuit], completion: str) -> list[torch.Tensor]:
        """The route features of the other facts' prompts that ``gate`` (a new circuit's) reaches: prompts of
        ``circuits`` with another answer than ``completion``. A new gate keyed on a prefix a taught prompt shares
        (``get_delta_owner`` beside ``get_delta_timeout``) reaches that prompt though the new prompt does not
        reach its gate: the other way round from a look-alike."""
        out = []
        for c in circuits:
            if c.gate is None or not c.gate.tokens or any(e[2] == completion for e in c.examples):
                continue
            out += [f for f in (self._states(e[1]) for e in c.examples) if gate.distance(f) <= 1.0]
        return out

    def _separated(self, circuit: Circuit, feature: torch.Tensor) -> Gate:
        """``circuit``'s gate no longer reaching this input (another fact's prompt): raised above it, and where it
        cannot be (the input matches its keys exactly), with those prototypes made again from the circuit's own
        prompts, keyed on tokens the input lacks."""
        gate = circuit.gate.excluding(feature)
        if gate.distance(feature) > 1.0:
            return gate
        # its prompts as its gate saw them (a conversation is remembered as what its author wrote, whose tokens
        # alone are not the prompt the keys came from: that one is left as it is)
        own = [self.rt.encode(e[1]) for e in circuit.examples if circuit.gate.distance(self._states(e[1])) <= EXACT]
        return self.rt.router.separated(gate, feature, own) if own else gate

    def _affinities(
        self, circuits: list[Circuit], capture: dict[str, torch.Tensor], feature: torch.Tensor | None
    ) -> tuple[list[float], dict[str, float]]:
        """How much of each circuit's pattern this input is, on one scale: a gated circuit by its route distance
        (see routing.py), an ungated one by its key's activation relative to its activation on its own origin.
        Also the gated circuits' route distances, by id (their gates matched all at once)."""
        router = self.rt.router
        routed = [c for c in circuits if feature is not None and c.gate is not None]
        keyed = [c for c in circuits if feature is None or c.gate is None]  # only these need key activations
        score = {c.id: a / (c.key_self or 1.0) for c, a in zip(keyed, key_activations(keyed, capture))}
        distance = router.distances(routed, feature)
        score.update({c.id: router.affinity(distance[c.id]) for c in routed})
        return [score[c.id] for c in circuits], distance

    def learn(self, agent_id: str, prompt_ids: list[int], completion_ids: list[int], critical: bool) -> LearnResult:
        rt, cfg = self.rt, self.rt.config.learning
        ids, labels = _example(prompt_ids, completion_ids, rt.device)
        texts = self._texts(prompt_ids, completion_ids)
        capture = self._capture_base(agent_id, ids)
        feature = None
        if rt.router.enabled:
            feature = rt.router.feature_of(capture, prompt_ids)

        def skip():  # the gated circuits this prompt does not reach, as the stack stands now
            return None if feature is None else rt.router.skip([rt.gated_circuits(agent_id)], feature[None])

        stack = rt.hierarchy.stack_scopes(agent_id)  # foundation … context
        context = list(stack[-1].circuits.values())
        slower = [c for scope in stack[:-1] for c in scope.circuits.values()]  # agent tier and the shared ones
        acts, distance = self._affinities(context + slower, capture, feature)
        ctx_acts, slower_acts = acts[: len(context)], acts[len(context) :]
        # usage is activation: every circuit whose key this input matches is used, whichever of them learns
        for c, a in zip(context + slower, acts):
            if a >= cfg.attribution_threshold:
                self.on_use(c)

        # A pattern that already migrated to a slower tier (the agent's own, or a shared one by consensus) is
        # reinforced there (a use), not learned again, unless the stack has lost it (see _still_known).
        if (
            slower_acts
            and max(slower_acts) >= cfg.attribution_threshold
            and max(slower_acts) >= max(ctx_acts, default=0)
        ):
            known = slower[slower_acts.index(max(slower_acts))]
            still_known, loss = self._still_known(agent_id, known, ids, labels, skip())
            if still_known:
                known.observe_example(max(slower_acts), *texts)
                return LearnResult(known.id, False, max(slower_acts), loss, loss, None, trained=False)

        best, best_act = (context[ctx_acts.index(max(ctx_acts))], max(ctx_acts)) if ctx_acts else (None, 0.0)
        dropped = None
        spawned = best is None or best_act < cfg.attribution_threshold
        others: list[Circuit] = []  # token gates: circuits of other facts whose gates this prompt reaches
        if not spawned and rt.router.tokens and self._another_fact(best, *texts):
            # a new prompt that reaches a circuit holding another answer is another fact that looks alike, not
            # that circuit's fact asked another way: it gets a circuit of its own, with a threshold above their prompts
            others = [c for c in context if c.gate is not None and c.gate.tokens and distance[c.id] <= 1.0]
            spawned = True
            if cfg.exclude_lookalikes:  # and theirs no longer reach it: their circuits stop acting on this prompt
                for c in others:
                    if self._another_fact(c, *texts):
                        c.gate = self._separated(c, feature)
        if spawned:
            # kept out of the keys of the SCREENED circuits that act where it will: ungated ones and those whose
            # gates this prompt reaches (a gated circuit elsewhere never acts with it, and 576 rank-1 fact keys
            # would fill a value projection's whole input space)
            theta = cfg.attribution_threshold  # (a routed circuit's affinity is at least theta where it is reached)
            acting = [c for c, a in zip(context + slower, acts) if c.gate is None or a >= theta]
            best, dropped = self._spawn(agent_id, capture, acting)
            best_act = 0.0
            self.on_use(best)
        if feature is not None and (spawned or (best.gate is not None and best.gate.distance(feature) > 1e-6)):
            # a new prompt of this circuit becomes a key of its gate (a circuit made with routing off stays ungated)
            router = rt.router
            negatives = [self._states(e[1]) for c in others for e in c.examples]
            best.gate = (
                router.new_gate(feature, prompt_ids, agent_id, negatives)
                if spawned
                else router.extend_gate(best.gate, feature, prompt_ids, agent_id)
            )
            if spawned and best.gate.tokens and cfg.exclude_lookalikes:  # and it stays off their prompts
                known = {c.id for c in others}
                reached = self._reached_prompts(best.gate, [c for c in context if c.id not in known], texts[1])
                if reached:
                    negatives += reached
                    best.gate = router.new_gate(feature, prompt_ids, agent_id, negatives)
            for negative in negatives:  # a look-alike that matches the new keys exactly: keyed where they differ
                if best.gate.distance(negative) <= 1.0:
                    best.gate = router.separated(best.gate, negative, [prompt_ids])
        best.observe_example(1.0 if spawned else best_act, *texts)
        routes = skip()
        subject = None
        if cfg.subject_locality > 0 and feature is not None and rt.router.tokens and best.gate is not None:
            subject = subject_text(rt, agent_id, best, prompt_ids, feature, self._continuations)
        examples = [(ids, labels), *self._variants(prompt_ids, completion_ids)]
        loss_before = self._train(agent_id, best, examples, routes, subject)
        best.critical = best.critical or critical
        best.updated_tick = rt.clock.tick
        best.origin_interactions.append(rt.clock.interactions)
        if agent_id not in best.origin_agents:
            best.origin_agents.append(agent_id)
        with torch.no_grad():
            best.last_loss = float(self._loss(agent_id, ids, labels, trainable=False, skip=routes))
        return LearnResult(best.id, spawned, best_act, loss_before, best.last_loss, dropped)

    def internalize(
        self,
        agent_id: str,
        prompt_ids: list[int],
        completion_ids: list[int],
        without: tuple[str, ...],
        steps: int,
        learning_rate: float,
    ) -> tuple[Circuit, int, bool]:
        """Train a new circuit until the agent's stack, less the tiers in ``without``, plus the circuit, produces
        ``completion_ids`` greedily after ``prompt_ids`` (checked by teacher forcing: every next-token argmax equals
        the target), or for at most ``steps`` steps. Returns (circuit, steps taken, reproduced).

        The circuit is keyed and gated like a context circuit (explained-variance A on the base model's inputs, B
        from zero, this prompt as its prototype) and belongs to no scope yet: the caller places it (see
        wavegen.controller).
        """
        rt = self.rt
        ids, labels = _example(prompt_ids, completion_ids, rt.device)
        targets = ids[0, len(prompt_ids) :]
        circuit = self._keyed_circuit(self._capture_base(agent_id, ids), agent_id, "", "")
        if rt.router.enabled:  # gated like a context circuit: it holds this prompt's continuation
            circuit.gate = rt.router.new_gate(rt.router.features([prompt_ids])[0], prompt_ids, agent_id)
        routes = rt.route([agent_id], [prompt_ids])
        params = [b for _, b in circuit.factors.values()]
        opt = torch.optim.Adam(params, lr=learning_rate)
        reproduced, step = False, 0
        for t in params:
            t.requires_grad_(True)
        try:
            for step in range(steps + 1):
                plan = rt.planner.plan([agent_id], trainable=True, without=without, extra=(circuit,), skip=routes)
                with rt.activate(plan, rt.new_session(plan, observe=False)):
                    out = rt.model(input_ids=ids, labels=labels, use_cache=False)
                predicted = out.logits[0, len(prompt_ids) - 1 : -1].argmax(-1)
                reproduced = bool(torch.equal(predicted, targets))
                if reproduced or step == steps:
                    break
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if rt.config.learning.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, rt.config.learning.max_grad_norm)
                opt.step()
            circuit.last_loss = float(out.loss.detach())
        finally:
            for t in params:
                t.requires_grad_(False)
                t.grad = None
        return circuit, step, reproduced
