"""Time scales each tier actually exhibits, measured rather than configured.

A tier's scale is the median residence time (in ticks) of the circuits that left it (by migration
or by being forgotten); while none has left yet, the median age of those still in it, as a lower bound.
Its *memory span* is the median lifetime of the circuits it forgot: how long an unreinforced pattern
survives there. Detector windows derive from the span (deriving them from residences would feed back:
a circuit that migrates stayed about one window, so the next window would grow by the scale factor).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from ..config import TIERS


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

    def measure(self, tier: str, alive_ages: list[int]) -> float | None:
        done = self.residences[tier]
        if done:
            return float(statistics.median(done))
        return float(statistics.median(alive_ages)) if alive_ages else None

    def state(self) -> dict[str, Any]:
        return {
            "residences": {t: list(v) for t, v in self.residences.items()},
            "lifetimes": {t: list(v) for t, v in self.lifetimes.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        for kind in ("residences", "lifetimes"):
            for t, values in state.get(kind, {}).items():
                getattr(self, kind)[t].extend(values)
