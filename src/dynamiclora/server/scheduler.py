"""Continuous (iteration-level) batching: rows join the running decode between steps and leave as they finish.

Each step of the loop (server.engine) first admits waiting requests: a WaveGen hit is served at once (a jump
needs no forward; a verified draft runs its own short decode), a miss is prefilled with the other newcomers in
one heterogeneous forward and joins the running rows (generation.join). Then one forward decodes a token for
every running row, whatever agent it belongs to and however long it has run; a row that stops (EOS, its
``max_tokens``, a stop string, or its client gone) leaves before the next forward (generation.keep_rows), and a
miss's trajectory is stored in the cache as if it had been decoded alone.

A row decodes exactly what it would alone: its keys and values keep their positions, its padding is masked,
the plan gives it its own stack, and no state it reads changes while it runs — a learn into an agent waits until
that agent has no running row, and a tick until no row runs (the engine's barrier). Tokens are sampled per row
with the row's own settings.

Text is streamed as it is decoded: each step decodes the row's tokens so far and sends what is new, holding
back an incomplete UTF-8 character and anything that could still become a stop string.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import TIERS, GenerationConfig
from ..generation import DecodeState, feed, join, joinable, keep_rows, prefill, row_generators, run, sample_next
from ..runtime import Runtime, left_padded
from ..wavegen.controller import WaveController
from ..wavegen.observe import Recorder
from ..wavegen.signature import sampling_key


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length" ("cancelled" when the client left)
    cache: str = "off"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None  # per generated token: {"token", "logprob", "top": [(token, logprob)]}
    reply_ids: list[int] | None = None  # the tokens ``text`` decodes from, EOS left out (None: cut at a stop)


@dataclass
class GenerateJob:
    agent_id: str
    prompt: str
    prompt_ids: list[int]  # tokenized once, where the request's length was checked
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    base_only: bool = False  # the base model alone (no tier of the agent's stack)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top alternatives per generated token (0: the chosen token only); None: none
    seed: int | None = None  # a sampled row draws from its own generator: seeded, its tokens depend on nothing else
    on_text: Callable[[str], None] | None = None  # streaming: called on the engine thread with each new piece
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return (self.base_only, self.temperature, self.top_p)

    def config(self, base: GenerationConfig) -> GenerationConfig:
        return replace(
            base, max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as text; a piece of a UTF-8 character (which decodes to U+FFFD) as the tokenizer's own name for it,
    so that different tokens stay different keys of a top-logprobs table."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text


def token_logprobs(logits: torch.Tensor, chosen: int, top: int, tokenizer: Any) -> dict:
    """The chosen token's log-probability under the model (temperature 1) and the ``top`` most likely ones."""
    logp = logits.float().log_softmax(-1)
    out: dict[str, Any] = {"token": token_text(tokenizer, chosen), "logprob": float(logp[chosen])}
    if top:
        values, ids = logp.topk(min(top, logp.shape[-1]))
        out["top"] = [(token_text(tokenizer, int(i)), float(v)) for v, i in zip(values, ids)]
    return out


@torch.no_grad()
def prompt_logprobs(
    rt: Runtime, agent_id: str, ids: list[int], top: int, base_only: bool = False
) -> list[dict | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first), under the agent's
    stack routed by the whole prompt, as generating after it would be (or the base model alone)."""
    plan = rt.planner.plan([agent_id], without=TIERS if base_only else (), skip=rt.route([agent_id], [ids]))
    with rt.activate(plan, rt.new_session(plan, observe=False)):
        logits = rt.model(input_ids=torch.tensor([ids], device=rt.device), use_cache=False).logits[0]
    return [None] + [token_logprobs(logits[i - 1], ids[i], top, rt.tokenizer) for i in range(1, len(ids))]


class TextStream:
    """A row's text as it grows: what may be sent now, holding back what could still change or be cut."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self.decode, self.stops = decode, stops
        self.sent = 0

    def update(self, tokens: list[int]) -> tuple[str, bool]:
        """(the full text, cut at a stop string; whether a stop string was found)."""
        text = self.decode(tokens)
        cuts = [text.find(s) for s in self.stops if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def ready(self, text: str, final: bool) -> str:
        """The new piece that can be sent (all of the rest when ``final``)."""
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
            for s in self.stops:  # a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text[end - k : end] == s[:k]:
                        end -= k
                        break
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


@dataclass
class Row:
    job: GenerateJob
    cfg: GenerationConfig
    skip: frozenset[str]
    stream: TextStream
    request: Any = None  # the WaveGen request of a miss (None: cache off, or the base model)
    recorder: Recorder | None = None  # the trajectory a miss is stored with (only rows with a request)
    vector: torch.Tensor | None = None
    touched: dict[str, float] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None  # this row's own draws (sampled rows)


class Scheduler:
    """The running batch: admits requests, decodes one token per row per step, finishes rows."""

    def __init__(
        self,
        runtime: Runtime,
        wavegen: WaveController,
        use_cache: bool,
        on_finished: Callable[[GenerateJob, Completion], None],
    ) -> None:
        self.rt, self.wavegen, self.use_cache = runtime, wavegen, use_cache
        self.on_finished = on_finished  # resolves the job's future (and counts the interaction)
        self.rows: list[Row] = []
        self.state: DecodeState | None = None
        self.joinable: bool | None = None  # learned at the first prefill (a sliding-window cache is not)
        self.stats = {"steps": 0, "admitted": 0, "served_from_cache": 0, "tokens": 0, "cancelled": 0, "peak_rows": 0}

    @property
    def agents(self) -> set[str]:
        return {r.job.agent_id for r in self.rows}

    def _decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids, skip_special_tokens=True)

    # -- admission --------------------------------------------------------------------------------------
    def admit(self, jobs: list[GenerateJob]) -> None:
        """Serve cache hits now; prefill the misses together and add them to the running rows."""
        rt = self.rt
        if self.use_cache:
            self.wavegen.cache.sync(rt.hierarchy)
        misses: list[Row] = []
        for job in jobs:
            cfg = job.config(rt.config.generation)
            row = Row(job, cfg, frozenset(), TextStream(self._decode, job.stop))
            if not cfg.greedy:  # its own draws: a batch-mate's sampling never moves them
                row.generator = row_generators(cfg, 1, rt.generator)[0]
            if job.cancelled.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                self._finish(row, "off", cancelled=True)
                continue
            if self.use_cache and job.logprobs is None:  # a cached answer has no logprobs to give
                row.request = self.wavegen.open(0, job.agent_id, job.prompt_ids, cfg, sampling_key(cfg))
                served = self.wavegen.serve(row.request, cfg, self.wavegen.config.mode)
                if served is not None:
                    self.stats["served_from_cache"] += 1
                    row.tokens = list(served.token_ids)
                    self._finish(row, served.cache)
                    continue
                row.recorder = Recorder([job.prompt_ids], self.wavegen.config.observe_top_k)
            misses.append(row)
        if misses:
            self._prefill(misses)

    def _prefill(self, rows: list[Row]) -> None:
        rt = self.rt
        agents, prompts = [r.job.agent_id for r in rows], [r.job.prompt_ids for r in rows]
        pooled: list[torch.Tensor] = []

        def run(plan, session) -> DecodeState:
            pooled.clear()  # (a run stopped in doubt pooled nothing, but start clean)
            with torch.no_grad(), rt.activate(plan, session):
                return prefill(rt.decoder_forward(session, True, pooled), prompts, pad_id=rt.pad_id, device=rt.device)

        # routed inside the prefill where no circuit acts before the route module (no route pre-pass)
        routed = rt.run_routed(agents, (), left_padded(prompts), run)
        state, plan, session = routed.result, routed.plan, routed.session
        skips = routed.skip or tuple(frozenset() for _ in rows)
        rt.use_routes(plan)
        acts = rt.record_usage(plan, session)
        for i, r in enumerate(rows):
            r.skip, r.vector = skips[i], pooled[0][i].cpu()
            r.touched = {plan.circuits[c].id: acts[i][c] for c in plan.row_columns[i]}
        self.stats["admitted"] += len(rows)
        if self.joinable is None:
            self.joinable = joinable(state)
        if not self.joinable:  # this model's cache cannot take rows of other lengths: these rows run to the end
            self._run_alone(rows, state, plan)
            return
        self.state = state if self.state is None else join([self.state, state], rt.pad_id)
        self.rows += rows

    def _run_alone(self, rows: list[Row], state: DecodeState, plan) -> None:
        """Static batching for caches that cannot be joined (sliding windows): the group decodes to its end."""
        rt = self.rt
        cfg = replace(rows[0].cfg, max_new_tokens=max(r.cfg.max_new_tokens for r in rows))
        session = rt.new_session(plan, observe=False)

        def observe(logits, chosen, running):
            for i, r in enumerate(rows):
                if bool(running[i]):
                    self._observe(r, logits[i], int(chosen[i]))

        with torch.no_grad(), rt.activate(plan, session):
            run(
                rt.decoder_forward(session, True),
                state,
                cfg,
                pad_id=rt.pad_id,
                eos_id=rt.tokenizer.eos_token_id,
                generator=rt.generator,
                observer=observe,
            )
        for r, tokens in zip(rows, state.out):
            r.tokens = tokens[: r.cfg.max_new_tokens]
            r.logprobs = r.logprobs[: len(r.tokens)]
            self._finish(r, "miss" if r.request is not None else "off")

    # -- decoding ---------------------------------------------------------------------------------------
    def step(self) -> None:
        """One token for every running row; finished rows leave; the rest are fed in one forward."""
        rt, state = self.rt, self.state
        self.stats["steps"] += 1
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.rows))
        chosen = state.logits.argmax(-1).tolist()  # greedy rows: one argmax for the batch
        for i, r in enumerate(self.rows):
            if r.generator is not None:
                chosen[i] = int(sample_next(state.logits[i : i + 1], r.cfg, r.generator)[0])
            self._observe(r, state.logits[i], chosen[i])
        keep = []
        for i, r in enumerate(self.rows):
            text, ended = self._ended(r, r.tokens)
            done = ended or len(r.tokens) >= r.cfg.max_new_tokens
            if r.job.cancelled.is_set():
                self.stats["cancelled"] += 1
                self._finish(r, "off", cancelled=True)
            elif done:
                self._finish(r, "miss" if r.request is not None else "off")
            else:
                if r.job.on_text is not None:
                    piece = r.stream.ready(text, final=False)
                    if piece:
                        r.job.on_text(piece)
                keep.append(i)
        self.stats["tokens"] += len(self.rows)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            state = keep_rows(state, keep) if keep else None
            self.state = state
        if not self.rows:
            self.state = None
            return
        tokens = torch.tensor([chosen[i] for i in keep], device=state.ids.device)
        plan = rt.planner.plan([r.job.agent_id for r in self.rows], skip=tuple(r.skip for r in self.rows))
        session = rt.new_session(plan, observe=False)
        with torch.no_grad(), rt.activate(plan, session):
            feed(rt.decoder_forward(session, True), state, tokens)

    def _observe(self, r: Row, logits: torch.Tensor, token: int) -> None:
        r.tokens.append(token)
        if r.recorder is not None:
            r.recorder(logits[None], torch.tensor([token], device=logits.device), torch.ones(1, dtype=torch.bool))
        if r.job.logprobs is not None:
            r.logprobs.append(token_logprobs(logits, token, r.job.logprobs, self.rt.tokenizer))

    def _ended(self, r: Row, tokens: list[int]) -> tuple[str, bool]:
        """The row's text (cut at a stop string) and whether it stopped: a stop string, or EOS."""
        eos = self.rt.tokenizer.eos_token_id
        text, stopped = r.stream.update(tokens)
        return text, stopped or bool(r.cfg.stop_at_eos and eos is not None and tokens and tokens[-1] == eos)

    def _reply_ids(self, tokens: list[int], text: str) -> list[int] | None:
        """The tokens ``text`` is exactly the decoding of: all but a final EOS, or fewer where a stop string cut
        the text (searched back from the end, where the cut is); None where no prefix decodes to it."""
        eos = self.rt.tokenizer.eos_token_id
        ids = tokens[:-1] if tokens and tokens[-1] == eos else list(tokens)
        for k in range(len(ids), -1, -1):
            decoded = self._decode(ids[:k])
            if decoded == text:
                return ids[:k]
            if len(decoded) < len(text):
                return None
        return None

    def _finish(self, r: Row, cache: str, cancelled: bool = False) -> None:
        tokens = r.tokens[: r.cfg.max_new_tokens]
        text, ended = self._ended(r, tokens)
        reason = "cancelled" if cancelled else "stop" if ended else "length"
        if r.job.on_text is not None and not cancelled:
            piece = r.stream.ready(text, final=True)
            if piece:
                r.job.on_text(piece)
        if r.recorder is not None and not cancelled:  # decoded here: close the miss (WaveGen closed what it served)
            timings = {"total_s": time.perf_counter() - r.started}
            traj = r.recorder.trajectories[0]
            self.wavegen.close_miss(r.request, tokens, traj, r.vector, r.touched, timings)
        logprobs = r.logprobs if r.job.logprobs is not None else None
        completion = Completion(
            text, len(r.job.prompt_ids), len(tokens), reason, cache, tokens, logprobs, self._reply_ids(tokens, text)
        )
        self.on_finished(r.job, completion)
