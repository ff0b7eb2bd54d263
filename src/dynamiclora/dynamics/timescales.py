"""Time scales each tier actually exhibits, measured rather than configured.

A tier's *time scale* is the mean time a circuit stays in it, by Little's law: the circuit-ticks spent in the
tier divided by the departures from it (by migration or by being forgotten), over the recent departures and
everything still there. Circuits still present count with their age, so a tier that keeps what it holds (its
circuits rarely leave) measures slow even in a finite run; while nothing has left at all, the oldest age is
reported as a lower bound. Its *memory span* is the median lifetime of the circuits it forgot: how long an
unreinforced pattern survives there.

Detector windows (memory.Memory.window) derive from these figures: a tier's window is at least its own memory
span (persistence means outliving ordinary forgetting) and at least the time scale of the faster tier below it
(what belongs to a slower tier must outlast the faster one).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..config import TIERS


@dataclass(frozen=True)
class Scale:
    ticks: float | None  # mean residence in the tier (None: nothing has ever been in it)
    lower_bound: bool  # nothing has left the tier yet: ``ticks`` is the oldest age there


def mean_residence(ended: list[int], censored: list[int]) -> Scale:
    """Mean time in the tier by Little's law: circuit-ticks spent there over departures (the maximum-likelihood
    estimate for exponential residence, with ``censored`` circuits still present counted as exposure)."""
    if not ended:
        return Scale(float(max(censored)) if censored else None, bool(censored))
    return Scale((sum(ended) + sum(censored)) / len(ended), False)


class Timescales:
    def __init__(self, history: int = 256) -> None:
        self.residences: dict[str, deque[int]] = {t: deque(maxlen=history) for t in TIERS}
        self.lifetimes: dict[str, deque[int]] = {t: deque(maxlen=history) for t in TIERS}

    def left(self, tier: str, ticks: int, forgotten: bool) -> None:
        self.residences[tier].append(max(ticks, 1))
        if forgotten:
            self.lifetimes[tier].append(max(ticks, 1))

    def span(self, tier: str) -> float | None:
        return float(statistics.median(self.lifetimes[tier])) if self.lifetimes[tier] else None

    def measure(self, tier: str, alive_ages: list[int]) -> Scale:
        return mean_residence(list(self.residences[tier]), [max(a, 1) for a in alive_ages])

    def state(self) -> dict[str, Any]:
        return {
            "residences": {t: list(v) for t, v in self.residences.items()},
            "lifetimes": {t: list(v) for t, v in self.lifetimes.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        for kind in ("residences", "lifetimes"):
            for t, values in state.get(kind, {}).items():
                getattr(self, kind)[t].extend(values)
