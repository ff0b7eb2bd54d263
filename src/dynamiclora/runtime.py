"""The runtime: the one component that touches the model.

It wraps a Transformers causal LM (``stack``), builds per-batch plans (``planner``), routes (``routing``), runs
forwards and decodes (``generation``), and places circuits into scopes after checking them against the adapted
modules. It reads the hierarchy and the clock and reports uses through ``on_use``; it knows nothing of the memory
dynamics, learning, the cache or persistence, which are built on it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chat import ChatFormat
from .circuits import Circuit
from .config import DynamicLoRAConfig, GenerationConfig
from .errors import ConfigError, InvalidInputError, PromptTooLongError
from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .generation import Decoded, ForwardFn, Observer, decode, row_generators
from .hierarchy import Clock, Hierarchy, ScopeKey, Snapshot
from .inline_routing import InlineRoute, InlineRouting, RouteInDoubt
from .planner import BatchPlan, Planner
from .routing import Router
from .stack import Session, StackedLinear, find_target_modules, inject, probe_input_groups


@dataclass
class Routed:
    """What :meth:`Runtime.run_routed` ran: the run's result, the plan and session it ran under, and per row the
    gated circuits its prompt does not reach (None when routing is off)."""

    result: Any
    plan: BatchPlan
    session: Session
    skip: tuple[frozenset[str], ...] | None


def left_padded(prompts: list[list[int]]) -> Callable[[], list[tuple[list[int], torch.Tensor]]]:
    """``rows`` for :meth:`Runtime.run_routed` of a prefill, which left-pads every prompt to the longest: each
    prompt and its positions."""
    width = max(len(p) for p in prompts)
    return lambda: [(p, torch.arange(width - len(p), width)) for p in prompts]


class Runtime:
    """The base model with its adapted layers, and everything that runs them."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, config: DynamicLoRAConfig, hierarchy: Hierarchy, clock: Clock
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.hierarchy = hierarchy
        self.clock = clock
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.base_fingerprint = model_fingerprint(self.model)
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        names = find_target_modules(self.model, config.adapter.target_modules, config.adapter.exclude_modules)
        if not names:
            raise ConfigError(
                f"AdapterConfig.target_modules={config.adapter.target_modules!r} matches no Linear/Conv1D module of "
                f"{type(model).__name__}; list module names with model.named_modules() and adjust the patterns"
            )
        self.layers: dict[str, StackedLinear]
        self.layers, self.binding = inject(self.model, names)
        self.planner = Planner(self.layers, hierarchy, config.adapter, probe_input_groups(self.model, self.layers))
        tokens = config.learning.route_match == "tokens"
        route_module = config.learning.route_module or names[len(names) // 7 if tokens else 0]
        if route_module not in self.layers:
            raise ConfigError(
                f"LearningConfig.route_module {route_module!r} is not an adapted module; choose one of {names[:4]} …"
            )
        patterns = config.learning.circuit_modules
        route_index = names.index(route_module)
        # the modules a newly learned circuit covers (LearningConfig.circuit_modules, circuits_after_route)
        candidates = names[route_index:] if config.learning.circuits_after_route else names
        self.circuit_modules = [n for n in candidates if patterns is None or any(re.search(p, n) for p in patterns)]
        if not self.circuit_modules:
            raise ConfigError(
                f"LearningConfig.circuit_modules={patterns!r} matches no adapted module"
                + (f" at or after the route module {route_module!r}" if config.learning.circuits_after_route else "")
                + f"; choose among {candidates[:4]} …"
            )
        self.chat = ChatFormat(tokenizer)
        self.router = Router(
            self.model, self.layers[route_module], route_module, tokenizer, self.chat, config.learning
        )
        self.inline = InlineRouting(self.router, self.planner, hierarchy, self.binding, frozenset(names[:route_index]))
        self.generator = torch.Generator().manual_seed(config.seed)
        # which forwards sample the merged tiers' usage: its own stream, so that observing never shifts sampling
        self.usage_sampler = torch.Generator().manual_seed(config.seed + 1)
        self.on_use: Callable[[Circuit], None] = lambda circuit: None  # a request used this circuit
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token

    def snapshot(self, agent_id: str) -> Snapshot:
        scopes = self.hierarchy.stack_scopes(agent_id)
        return Snapshot(
            agent_id,
            self.base_fingerprint,
            self.tokenizer_fingerprint,
            tuple((str(s.key), s.content_hash()) for s in scopes),
        )

    def place(self, scope: str | ScopeKey, circuit: Circuit, pinned: bool = False) -> Circuit:
        """Put a circuit into a scope (shared scopes are created on demand), checked against the adapted modules;
        factors move to the model's device. ``pinned``: it never decays and is never forgotten."""
        circuit.pinned = pinned
        unknown = sorted(set(circuit.factors) - set(self.layers))
        if unknown:
            raise ConfigError(f"circuit {circuit.id} has factors for modules that are not adapted: {unknown[:5]}")
        for name, (a, b) in circuit.factors.items():
            layer = self.layers[name]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ConfigError(
                    f"circuit {circuit.id}: module {name!r} expects A (r × {layer.in_features}) and "
                    f"B ({layer.out_features} × r), got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            circuit.factors[name] = (a.detach().float().to(self.device), b.detach().float().to(self.device))
        circuit.entered_tick = self.clock.tick
        circuit.scale_on_entry = circuit.scale_on_entry or circuit.scale
        self.hierarchy.scope(scope, create=True).add(circuit)
        return circuit

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def new_session(
        self,
        plan: BatchPlan,
        observe: bool | None = None,
        capture: bool = False,
        mask: torch.Tensor | None = None,
        sample: bool | None = None,
    ) -> Session:
        """A session for one run of ``plan``. ``sample``: whether it samples the merged tiers' usage (None: drawn
        now; a run that starts over after an inline route in doubt keeps its first draw)."""
        rate = self.config.adapter.merged_usage_sample_rate
        if sample is None:
            sample = (
                bool(plan.merged_circuits) and rate > 0 and float(torch.rand((), generator=self.usage_sampler)) < rate
            )
        return Session(
            len(plan.agent_ids),
            len(plan.circuits),
            len(plan.merged_circuits),
            observe=self.config.adapter.observe_usage if observe is None else observe,
            sample_merged=sample,
            mask=mask,
            capture={} if capture else None,
        )

    @contextlib.contextmanager
    def activate(self, plan: BatchPlan, session: Session | None = None) -> Iterator[Session | None]:
        """Make every adapted layer apply ``plan`` (and record into ``session``) inside the block."""
        self.binding.plans, self.binding.session = plan.module_list, session
        try:
            yield session
        finally:
            self.binding.clear()

    def forward(
        self,
        agent_ids: Sequence[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        observe: bool | None = None,
        route_tokens: int | None = None,
    ) -> tuple[torch.Tensor, Session]:
        """Logits (B, T, V) of a batch whose row i runs agent_ids[i]'s stack, and the usage session.

        Gated circuits act on a row when its first ``route_tokens`` tokens (default: all of its real tokens) reach
        them: give the prompt's length to score a completion exactly as generating it would (see routing.py).

        ``observe=False`` skips the usage probe (default: ``AdapterConfig.observe_usage``). The probe's records stay in
        the returned session, reduced only when read (``session.activations()``): a forward pays for the
        observation, not for turning it into numbers nobody asked for. ``generate`` stores them on the circuits.
        """
        if len(agent_ids) != input_ids.shape[0]:
            raise InvalidInputError(
                f"got {len(agent_ids)} agent ids for a batch of {input_ids.shape[0]} rows; give one per row"
            )
        self.check_length(input_ids.shape[1])
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask

        def rows() -> list[tuple[list[int], torch.Tensor]]:  # each row's real tokens as far as they route, and where
            where = [k.nonzero().flatten()[:route_tokens].cpu() for k in mask]
            return [(r.cpu()[w].tolist(), w) for r, w in zip(input_ids, where)]

        def run(plan: BatchPlan, session: Session) -> torch.Tensor:
            with torch.no_grad(), self.activate(plan, session):
                return self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                    use_cache=False,
                ).logits

        routed = self.run_routed(agent_ids, (), rows, run, observe=observe, mask=attention_mask)
        return routed.result, routed.session

    def run_routed(
        self,
        agent_ids: Sequence[str],
        without: tuple[str, ...],
        rows: Callable[[], list[tuple[list[int], torch.Tensor]]],
        run: Callable[[BatchPlan, Session], Any],
        **session_options: Any,
    ) -> Routed:
        """``run(plan, session)`` on this batch (its rows' stacks less the tiers in ``without``) with every row
        routed: inside the forward where that gives the pre-pass's routes (see inline_routing.py), else after the
        pre-pass. ``rows``: a function giving each row's routed prompt and its positions in the batch;
        ``session_options`` go to :meth:`new_session`. A run stopped in doubt starts over, with the same draw of
        whether it samples the merged tiers' usage."""
        sample = None
        inline = self.inline_route(agent_ids, without, rows)
        if inline is not None:
            session = self.new_session(inline.plan, **session_options)
            try:
                with inline.hooked():
                    result = run(inline.plan, session)
                return Routed(result, inline.plan, session, inline.skip)
            except RouteInDoubt:
                sample = session.sample_merged
        skip = self.route(agent_ids, lambda: [p for p, _ in rows()])
        plan = self.planner.plan(list(agent_ids), without=without, skip=skip)
        session = self.new_session(plan, sample=sample, **session_options)
        return Routed(run(plan, session), plan, session, skip)

    def inline_route(
        self,
        agent_ids: Sequence[str],
        without: tuple[str, ...],
        rows: Callable[[], list[tuple[list[int], torch.Tensor]]],
    ) -> InlineRoute | None:
        """This batch routed inside its own forward, if that gives the pre-pass's routes (see inline_routing.py):
        some row's stack holds gated circuits and no circuit acts before the route module. ``rows``: a function
        giving each row's routed prompt and its positions in the batch."""
        if not self.router.enabled:
            return None
        gated = [self.gated_circuits(a) for a in agent_ids]
        if not any(gated) or not self.inline.applies(agent_ids, without):
            return None
        return self.inline.route(agent_ids, without, gated, rows())

    def route(
        self, agent_ids: Sequence[str], prompts: list[list[int]] | Callable[[], list[list[int]]]
    ) -> tuple[frozenset[str], ...] | None:
        """Per row, the gated circuits its prompt does not reach (None when routing is off). ``prompts`` may be a
        function, called only when some row's stack holds a gated circuit; only those rows' prompts are routed."""
        if not self.router.enabled:
            return None
        gated = [self.gated_circuits(a) for a in agent_ids]
        if not any(gated):
            return tuple(frozenset() for _ in agent_ids)
        prompts = prompts() if callable(prompts) else prompts
        needed = [i for i, g in enumerate(gated) if g]
        features: list = [None] * len(gated)
        for i, f in zip(needed, self.router.features([prompts[i] for i in needed])):
            features[i] = f
        return self.router.skip(gated, features)

    def gated_circuits(self, agent_id: str) -> list[Circuit]:
        """The gated circuits of an agent's stack."""
        return [c for s in self.hierarchy.stack_scopes(agent_id) for c in s.circuits.values() if c.gate is not None]

    def use_routes(self, plan: BatchPlan) -> None:
        """Each row of a request uses the gated circuits its prompt reached: those are the gated circuits in its
        plan (the others were skipped). Ungated circuits have no such signal; their use comes from learning."""
        for columns in plan.row_columns:
            for col in columns:
                if plan.circuits[col].gate is not None:
                    self.on_use(plan.circuits[col])

    def record_usage(self, plan: BatchPlan, session: Session) -> list[list[float]]:
        """Store the last observed activation on each circuit; returns the (rows × circuits) activations."""
        values = session.activations().tolist()
        for row, columns in enumerate(plan.row_columns):
            for col in columns:
                plan.circuits[col].usage = values[row][col]
        for c in plan.circuits:
            self.hierarchy.note(c)
        if session.merged_observations:
            merged = session.merged_activations().max(0).values.tolist()
            for col, c in enumerate(plan.merged_circuits):
                c.usage = merged[col]
                self.hierarchy.note(c)
        return values

    def check_length(self, total: int, prompt_tokens: int | None = None, new_tokens: int = 0) -> None:
        limit = self.max_positions
        if limit is not None and total > limit:
            detail = (
                f"{prompt_tokens} prompt tokens + {new_tokens} new tokens"
                if prompt_tokens is not None
                else f"{total} tokens"
            )
            raise PromptTooLongError(
                f"{detail} = {total} exceed the model's context of {limit} positions; shorten the prompt "
                f"or lower max_new_tokens so that the sum is at most {limit}"
            )

    def encode(self, text: str, special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInputError(f"expected text (str), got {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt as the model reads it: text is tokenized (with the tokenizer's special tokens), token ids are
        taken as they are (a chat prompt, see :meth:`chat_ids`)."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        ids = list(prompt)
        vocab = self.model.get_input_embeddings().num_embeddings
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidInputError(f"a prompt is text or token ids in [0, {vocab}); got {ids[:8]!r}…")
        return ids

    def prompt_text_and_ids(self, prompt: str | Sequence[int]) -> tuple[str, list[int]]:
        """The prompt as text (token ids decoded) and as the ids the model reads (see :meth:`prompt_ids`)."""
        ids = self.prompt_ids(prompt)
        return (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)), ids

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The token ids the model reads for a conversation: the tokenizer's chat template with the assistant's
        turn opened (its special tokens come from the template, none are added)."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidInputError(
                "this tokenizer has no chat template; give a prompt as text, or set tokenizer.chat_template"
            )
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise InvalidInputError("messages must be a non-empty list of {'role': str, 'content': str}")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.encode(text, special=False)

    def readable(self, ids: Sequence[int]) -> str:
        """The prompt as a person would name it (labels, tables): see :meth:`ChatFormat.readable`."""
        return self.chat.readable(ids)

    def decoder_forward(self, session: Session, use_kv_cache: bool = True, pooled: list | None = None) -> ForwardFn:
        """The model call used by decoding, under the plan activated around it.

        ``forward(ids, mask, pos, past, keep=1)`` returns the last ``keep`` positions' logits ((B, V) when
        ``keep == 1``) and the KV cache. With ``pooled`` (a list), each prefill appends the mask-averaged final hidden
        state of the prompt (B, d): the model's own summary of the prompt, WaveGen's semantic vector.
        """

        cache = self._cache_argument

        def forward(ids, mask, pos, past, keep: int = 1):
            prefill = past is None
            session.mask = mask if prefill else None
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                **{cache: past},
                use_cache=use_kv_cache,
                logits_to_keep=keep,
                output_hidden_states=pooled is not None and prefill,
            )
            if pooled is not None and prefill:
                weights = mask.unsqueeze(-1).to(out.hidden_states[-1].dtype)
                pooled.append(((out.hidden_states[-1] * weights).sum(1) / weights.sum(1).clamp_min(1)).float())
            return (out.logits[:, -1] if keep == 1 else out.logits), getattr(out, cache)

        return forward

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The model's name for its KV cache, in its forward and its output: ``cache`` (Transformers 5.2x on;
        ``past_key_values`` is deprecated there), ``past_key_values`` before."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def generate_ids(
        self,
        agent_ids: Sequence[str],
        prompts: list[list[int]],
        cfg: GenerationConfig,
        use_kv_cache: bool = True,
        without: tuple[str, ...] = (),
        observer: Observer | None = None,
        pooled: list | None = None,
        interaction: bool = False,
    ) -> tuple[Decoded, list[dict[str, float]], dict[str, float]]:
        """Token-level generation: decoded rows, per row the circuits touched with their activations, timings.

        ``without`` leaves tiers out of every row's stack (``("context",)``: what the slower tiers alone produce);
        ``observer`` sees every step's logits (see generation.Observer); ``pooled`` collects the prompts' semantic
        vectors (see :meth:`decoder_forward`). ``interaction``: the rows are requests of their agents, which use
        the gated circuits their prompts reach (see :meth:`use_routes`); internal checks leave it off.
        """
        for ids in prompts:
            if not ids:
                raise InvalidInputError("the prompt is empty after tokenization; give at least one token of text")
            self.check_length(len(ids) + cfg.max_new_tokens, len(ids), cfg.max_new_tokens)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        # drawn before the prefill: a run that starts over after an inline route in doubt draws the same seeds
        generators = row_generators(cfg, len(prompts), self.generator)

        def run(plan: BatchPlan, session: Session) -> Decoded:
            t_plan = time.perf_counter()
            timings["plan_s"] = t_plan - t0

            def prefill_done():
                timings["prefill_s"] = time.perf_counter() - t_plan

            with torch.no_grad(), self.activate(plan, session):
                return decode(
                    self.decoder_forward(session, use_kv_cache, pooled),
                    prompts,
                    cfg,
                    pad_id=self.pad_id,
                    eos_id=self.tokenizer.eos_token_id,
                    device=self.device,
                    generator=generators,
                    use_kv_cache=use_kv_cache,
                    on_prefill_done=prefill_done,
                    observer=observer,
                )

        routed = self.run_routed(agent_ids, without, left_padded(prompts), run)
        decoded, plan, session = routed.result, routed.plan, routed.session
        timings["total_s"] = time.perf_counter() - t0
        if interaction:
            self.use_routes(plan)
        acts = self.record_usage(plan, session)
        touched = [{plan.circuits[c].id: acts[row][c] for c in plan.row_columns[row]} for row in range(len(prompts))]
        return decoded, touched, timings

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0
