"""A long benchmark run's progress on disk, so that a run cut off (a session's end, a crash) goes on where it
stopped instead of starting over: T = 1,000 sequential edits on SmolLM2 take longer than a 2-core machine is
often given at once.

What is kept is everything the rest of the run depends on: the method's memory as ``DynamicLoRA.save`` writes it
(circuits, gates, optimizer moments, generators, counters; a reloaded memory learns on as the saved one would) and
what was measured so far (evaluated rows, per-edit learn times). A run that resumes gives the figures a run that
never stopped would, except wall-clock times, which are the machine's of the day (the record lists where each
session began)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..continual.methods import DynamicLoRAMethod
from ..core import DynamicLoRA

EVERY = 50  # edits between checkpoints (besides one after each evaluation)


@dataclass
class Progress:
    """What a run has done: edits learned, their learn times and calls, the rows evaluated, and where each of its
    sessions began (0 for the first)."""

    run: dict[str, Any]  # what the run is: the method, its steps, the model; a checkpoint serves only its own run
    edits: int = 0
    learn_s: list[float] = field(default_factory=list)
    learn_calls: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    sessions: list[int] = field(default_factory=lambda: [0])
    state: str | None = None  # the directory, under the checkpoint's, that holds the memory after ``edits``


class Checkpoint:
    """Progress of one method's run under ``directory``: ``progress.json``, and the memory after its edits in the
    ``state-<edits>`` directory it names."""

    def __init__(self, directory: Path, label: str, run: dict[str, Any]) -> None:
        self.directory = Path(directory) / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        self.run = {"label": label, **run}  # what the run is (its steps, its model): the progress serves only it

    def restore(self, method: DynamicLoRAMethod, base) -> Progress:
        """The saved progress of this run with its memory loaded into ``method`` (on a copy of ``base``, the
        unadapted model), or a fresh start when nothing was saved."""
        run = self.run
        path = self.directory / "progress.json"
        if not path.exists():
            return Progress(run)
        progress = Progress(**json.loads(path.read_text()))
        if progress.run != run:
            raise ValueError(
                f"the checkpoint in {self.directory} is of another run ({progress.run}, not {run}): remove it or "
                "give another --checkpoint directory"
            )
        state = self.directory / progress.state
        method.dl = DynamicLoRA.load(state, model=copy.deepcopy(base), tokenizer=method.dl.tokenizer)
        progress.sessions.append(progress.edits)
        return progress

    def save(self, method: DynamicLoRAMethod, progress: Progress) -> None:
        """The memory into a directory of its own, then the progress that names it (replaced atomically), then
        the memory it named before: a crash at any point leaves a progress and the memory of the same edits."""
        self.directory.mkdir(parents=True, exist_ok=True)
        before, progress.state = progress.state, f"state-{progress.edits}"
        shutil.rmtree(self.directory / progress.state, ignore_errors=True)  # (left by a save cut off)
        method.dl.save(self.directory / progress.state)
        tmp = self.directory / "progress.json.tmp"
        tmp.write_text(json.dumps(asdict(progress)))
        os.replace(tmp, self.directory / "progress.json")
        if before is not None and before != progress.state:
            shutil.rmtree(self.directory / before, ignore_errors=True)


__all__ = ["EVERY", "Checkpoint", "Progress"]
