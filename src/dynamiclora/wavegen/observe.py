"""Observation of generation: what the model chose at each step, and how sure it was.

A :class:`Recorder` is the ``observer`` of :func:`dynamiclora.generation.run`: at every step it receives the
next-token logits and the chosen tokens of the batch and appends a :class:`StepObservation` per running row.
With ``modules``, forward hooks also keep those modules' inputs at the newest position, so each step carries
the activations that produced its logits (the input of circuit extraction, see extraction.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepObservation:
    token_id: int
    top_ids: list[int]  # the k most likely tokens, best first
    top_logits: list[float]
    rank: int  # tokens with a strictly higher logit than the chosen one (0: the argmax)
    prob: float  # the chosen token's probability under the model (softmax at temperature 1)
    activations: dict[str, torch.Tensor] | None = None  # module -> input at this step's position


@dataclass
class Trajectory:
    prompt_ids: list[int]
    steps: list[StepObservation] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [s.token_id for s in self.steps]

    def coherence(self) -> float:
        """Mean probability of the chosen tokens: 1 for a model certain of every step, near 1/V for noise."""
        return sum(s.prob for s in self.steps) / len(self.steps) if self.steps else 0.0

    def rank_pattern(self) -> list[int]:
        return [s.rank for s in self.steps]


class Recorder:
    """Builds one Trajectory per row of a decode (pass it as ``observer``)."""

    def __init__(self, prompts: list[list[int]], top_k: int = 5, modules: dict[str, nn.Module] | None = None) -> None:
        self.trajectories = [Trajectory(list(p)) for p in prompts]
        self.top_k = top_k
        self.modules = modules or {}
        self._latest: dict[str, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, chosen: torch.Tensor, running: torch.Tensor) -> None:
        logits = logits.float()
        k = min(self.top_k, logits.shape[-1])
        top = torch.topk(logits, k, dim=-1)
        chosen_logit = logits.gather(-1, chosen[:, None])
        ranks = (logits > chosen_logit).sum(-1).tolist()
        probs = logits.softmax(-1).gather(-1, chosen[:, None]).squeeze(-1).tolist()
        top_ids, top_vals, ids = top.indices.tolist(), top.values.tolist(), chosen.tolist()
        for row, traj in enumerate(self.trajectories):
            if not bool(running[row]):
                continue
            acts = {name: x[row].clone() for name, x in self._latest.items()} if self._latest else None
            traj.steps.append(StepObservation(ids[row], top_ids[row], top_vals[row], ranks[row], probs[row], acts))

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Keep the recorded modules' inputs at the newest position while the block runs."""

        def keep(name: str):
            def hook(_module, args):
                self._latest[name] = args[0][:, -1].detach().float().cpu()

            return hook

        handles = [m.register_forward_pre_hook(keep(name)) for name, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._latest.clear()
