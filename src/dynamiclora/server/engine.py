"""The engine: one worker thread owns the model; requests reach it through one bounded queue.

Generation requests waiting together are run as one heterogeneous batch (rows of different agents in one
forward, DESIGN 3), grouped by their sampling settings. Everything that changes state (learn, register,
tick) runs alone and is saved to the state directory *before* its future resolves, so whatever a client was
told succeeded survives a kill. A full queue raises :class:`Busy` at once (the server answers 429) instead of
letting memory grow.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import TIERS
from ..core import DynamicLoRA


class Busy(Exception):
    """The request queue is full."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    cache: str = "off"


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
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return (self.base_only, self.temperature, self.top_p)


@dataclass
class CallJob:
    fn: Callable[[], Any]
    durable: bool
    future: Future = field(default_factory=Future)


class Engine:
    def __init__(
        self,
        dl: DynamicLoRA,
        state_dir: Path,
        max_queue: int = 64,
        max_batch: int = 16,
        batch_wait_s: float = 0.01,
        batching: bool = True,
        use_cache: bool = True,
    ) -> None:
        self.dl, self.state_dir, self.use_cache = dl, state_dir, use_cache
        self.max_batch = max_batch if batching else 1
        self.batch_wait_s = batch_wait_s if batching else 0.0
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"batches": 0, "rows": 0, "saves": 0, "rejected_busy": 0}
        self._held: deque = deque()  # jobs taken off the queue while gathering a batch, run next
        self._thread = threading.Thread(target=self._run, name="dynamiclora-engine", daemon=True)
        self._stop = threading.Event()

    # -- submitting -----------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: GenerateJob | CallJob) -> Future:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected_busy"] += 1
            raise Busy(f"the request queue is full ({self.queue.maxsize} waiting); retry shortly") from None
        return job.future

    def call(self, fn: Callable[[], Any], durable: bool = False) -> Future:
        return self.submit(CallJob(fn, durable))

    # -- the worker -----------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> GenerateJob | CallJob | None:
        if self._held:
            return self._held.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._next(timeout=0.1)
            if job is None:
                continue
            if isinstance(job, CallJob):
                self._call(job)
                continue
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                more = self._next(timeout=max(0.0, deadline - time.monotonic()))
                if more is None:
                    break
                if isinstance(more, CallJob):
                    self._held.append(more)  # state changes wait until this batch is served
                    break
                batch.append(more)
            self._generate(batch)

    def _call(self, job: CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            result = job.fn()
            if job.durable:
                self.save()
            job.future.set_result(result)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(e)

    def save(self) -> None:
        self.dl.save(self.state_dir)
        self.stats["saves"] += 1

    def _generate(self, batch: list[GenerateJob]) -> None:
        groups: dict[tuple, list[GenerateJob]] = {}
        for job in batch:
            if job.future.set_running_or_notify_cancel():
                groups.setdefault(job.group, []).append(job)
        for jobs in groups.values():
            try:
                results = self._generate_group(jobs)
            except BaseException as e:  # noqa: BLE001 - one failing group fails only its own requests
                for job in jobs:
                    job.future.set_exception(e)
                continue
            for job, result in zip(jobs, results):
                job.future.set_result(result)

    def _generate_group(self, jobs: list[GenerateJob]) -> list[Completion]:
        dl = self.dl
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        first = jobs[0]
        cfg = replace(
            dl.config.generation,
            max_new_tokens=max(j.max_tokens for j in jobs),
            temperature=first.temperature,
            top_p=first.top_p,
        )
        if len(jobs) == 1 and not first.base_only and self.use_cache:  # alone: through WaveGen, the agent's cache
            r = dl.agent(first.agent_id).generate(
                first.prompt_ids, max_new_tokens=first.max_tokens, temperature=first.temperature, top_p=first.top_p
            )
            return [self._finish(first, r.token_ids, r.finished, r.cache)]
        without = TIERS if first.base_only else ()
        agents, prompts = [j.agent_id for j in jobs], [j.prompt_ids for j in jobs]
        decoded, _, _ = dl.generate_ids(agents, prompts, cfg, without=without, interaction=True)
        dl.count_interactions(len(jobs))
        return [
            self._finish(j, toks[: j.max_tokens], fin and len(toks) <= j.max_tokens)
            for j, toks, fin in zip(jobs, decoded.tokens, decoded.finished)
        ]

    def _finish(self, job: GenerateJob, tokens: list[int], finished: bool, cache: str = "off") -> Completion:
        text = self.dl.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "stop" if finished else "length"
        for s in job.stop:
            cut = text.find(s)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        return Completion(text, len(job.prompt_ids), len(tokens), reason, cache)
