"""The engine: one worker thread owns the model; requests reach it through one bounded queue.

``batching="continuous"`` (the default): generation requests join the running decode between steps and leave
as they finish (server.scheduler), rows of different agents in one forward (DESIGN 3), WaveGen hits served in
the same loop. ``"static"``: requests waiting together run as one batch to its end, grouped by their sampling
settings, a batch of several bypassing WaveGen, without logprobs (the earlier behaviour, kept to compare).
``"off"``: one request at a time (the continuous loop with one row).

Everything that changes state (learn, register, tick) runs alone and is saved to the state directory *before*
its future resolves, so whatever a client was told succeeded survives a kill. It runs between decode steps,
and only once no running row reads what it changes: a learn into an agent waits for that agent's running rows
(``waits_for``), a tick for every row, and requests behind it wait their turn (first come, first served). A
full queue raises :class:`Busy` at once (the server answers 429) instead of letting memory grow.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from ..config import TIERS
from ..core import DynamicLoRA
from .scheduler import Completion, GenerateJob, Scheduler, TextStream

BATCHING = ("continuous", "static", "off")


class Busy(Exception):
    """The request queue is full."""


@dataclass
class CallJob:
    fn: Callable[[], Any]
    durable: bool
    waits_for: frozenset[str] | None = None  # agents whose running rows it must wait for; None: every row
    future: Future = field(default_factory=Future)


class Engine:
    def __init__(
        self,
        dl: DynamicLoRA,
        state_dir: Path,
        max_queue: int = 64,
        max_batch: int = 16,
        batch_wait_s: float = 0.01,
        batching: bool | str = "continuous",
        use_cache: bool = True,
    ) -> None:
        batching = {True: "continuous", False: "off"}.get(batching, batching)  # type: ignore[arg-type]
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.dl, self.state_dir, self.use_cache, self.batching = dl, state_dir, use_cache, batching
        self.max_batch = max_batch if batching != "off" else 1
        self.batch_wait_s = batch_wait_s if batching == "static" else 0.0
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"batches": 0, "rows": 0, "saves": 0, "rejected_busy": 0, "tokens": 0}
        self._held: deque = deque()  # jobs taken off the queue and not yet run, in arrival order
        self._pending_interactions = 0  # finished requests not yet counted (a due tick waits for a quiet batch)
        self.scheduler = Scheduler(dl.runtime, dl.wavegen, use_cache, self._finished)
        self._thread = threading.Thread(target=self._run, name="dynamiclora-engine", daemon=True)
        self._stop = threading.Event()
        self._started = time.monotonic()

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

    def call(self, fn: Callable[[], Any], durable: bool = False, waits_for: frozenset[str] | None = None) -> Future:
        """Run ``fn`` on the engine thread. ``waits_for``: the agents whose running rows must finish first (a read
        or a registration: none, ``frozenset()``); None (anything that may change shared state): every row."""
        return self.submit(CallJob(fn, durable, waits_for))

    def live(self) -> dict[str, Any]:
        """The running batch, for /health and the dashboard."""
        rows = list(self.scheduler.rows)
        return {
            "batching": self.batching,
            "rows": len(rows),
            "agents": sorted({r.job.agent_id for r in rows}),
            "queued": self.queue.qsize() + len(self._held),
            "tokens_per_s": self.stats["tokens"] / max(time.monotonic() - self._started, 1e-9),
            "scheduler": dict(self.scheduler.stats),
        }

    # -- the worker -----------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> GenerateJob | CallJob | None:
        if self._held:
            return self._held.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        if self.batching != "static":  # "off" is the continuous loop with one row
            self._run_continuous()
        else:
            self._run_static()

    def _run_static(self) -> None:
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
            self._count_interactions()

    def _run_continuous(self) -> None:
        sched = self.scheduler
        while not self._stop.is_set():
            self._pull(block=not sched.rows and not self._held)
            admitted: list[GenerateJob] = []
            while self._held:
                job = self._held[0]
                if isinstance(job, CallJob):
                    if admitted or not self._clear(job.waits_for):
                        break  # rows ahead of it are admitted first; it runs once nothing it changes is read
                    self._call(self._held.popleft())
                    continue
                if self._tick_due() or len(sched.rows) + len(admitted) >= self.max_batch:
                    break  # a due tick lets the batch drain; a full batch takes newcomers as rows leave
                job = self._held.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                if job.base_only:  # the base model alone: its own short batch
                    self._generate_started([job])
                else:
                    admitted.append(job)
            if admitted:
                self._guard(admitted, lambda: sched.admit(admitted))
            if sched.rows:
                running = [r.job for r in sched.rows]
                self._guard(running, sched.step)
            self._count_interactions()

    def _guard(self, jobs: list[GenerateJob], fn: Callable[[], None]) -> None:
        """Run a scheduler call. If it fails, the batch's state is lost: its rows and ``jobs`` fail with the error
        (the loop goes on with the next requests)."""
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            sched = self.scheduler
            for job in jobs + [r.job for r in sched.rows]:
                if not job.future.done():
                    job.future.set_exception(e)
            sched.rows, sched.state = [], None

    def _pull(self, block: bool) -> None:
        """Move what waits in the queue behind what is held (waiting up to 0.1 s for something when idle)."""
        if block:
            job = self._next(timeout=0.1)
            if job is None:
                return
            self._held.append(job)
        while True:
            try:
                self._held.append(self.queue.get_nowait())
            except queue.Empty:
                return

    def _clear(self, waits_for: frozenset[str] | None) -> bool:
        running = self.scheduler.agents
        return not running if waits_for is None else not (running & waits_for)

    def _finished(self, job: GenerateJob, completion: Completion) -> None:
        self.stats["rows"] += 1
        self.stats["tokens"] += completion.completion_tokens
        self._pending_interactions += 1
        if not job.future.done():
            job.future.set_result(completion)

    def _tick_due(self) -> bool:
        """Would counting the finished requests run a tick? Then no new row starts until the batch is quiet."""
        every = self.dl.config.dynamics.tick_interval
        pending = self._pending_interactions
        return bool(every and pending and (self.dl.interactions % every) + pending >= every)

    def _count_interactions(self) -> None:
        if self._pending_interactions and not self.scheduler.rows:
            n, self._pending_interactions = self._pending_interactions, 0
            self.dl.count_interactions(n)

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
        self._generate_started([job for job in batch if job.future.set_running_or_notify_cancel()])

    def _generate_started(self, jobs: list[GenerateJob]) -> None:
        """Static batching: the jobs, grouped by sampling settings, each group decoded to its end."""
        groups: dict[tuple, list[GenerateJob]] = {}
        for job in jobs:
            groups.setdefault(job.group, []).append(job)
        for group in groups.values():
            try:
                results = self._generate_group(group)
            except BaseException as e:  # noqa: BLE001 - one failing group fails only its own requests
                for job in group:
                    job.future.set_exception(e)
                continue
            for job, result in zip(group, results):
                if job.on_text is not None and result.text:
                    job.on_text(result.text)
                self._finished(job, result)

    def _generate_group(self, jobs: list[GenerateJob]) -> list[Completion]:
        dl = self.dl
        self.stats["batches"] += 1
        first = jobs[0]
        cfg = replace(
            dl.config.generation,
            max_new_tokens=max(j.max_tokens for j in jobs),
            temperature=first.temperature,
            top_p=first.top_p,
        )
        if len(jobs) == 1 and not first.base_only and self.use_cache:  # alone: through WaveGen, the agent's cache
            r = dl.wavegen.generate_batch(
                [(first.agent_id, first.prompt_ids)],
                max_new_tokens=first.max_tokens,
                temperature=first.temperature,
                top_p=first.top_p,
            )[0]
            return [self._finish(first, r.token_ids, r.finished, r.cache)]
        without = TIERS if first.base_only else ()
        agents, prompts = [j.agent_id for j in jobs], [j.prompt_ids for j in jobs]
        decoded, _, _ = dl.generate_ids(agents, prompts, cfg, without=without, interaction=True)
        return [
            self._finish(j, toks[: j.max_tokens], fin and len(toks) <= j.max_tokens)
            for j, toks, fin in zip(jobs, decoded.tokens, decoded.finished)
        ]

    def _finish(self, job: GenerateJob, tokens: list[int], finished: bool, cache: str = "off") -> Completion:
        decode = partial(self.dl.tokenizer.decode, skip_special_tokens=True)
        text, stopped = TextStream(decode, job.stop).update(tokens)
        reason = "stop" if finished or stopped else "length"
        return Completion(text, len(job.prompt_ids), len(tokens), reason, cache, list(tokens))
