"""Time scales each tier actually exhibits, measured rather than configured.

A tier's scale is the median residence time (in ticks) of the circuits that left it (by migration
or by being forgotten); while none has left yet, the median age of those still in it, as a lower bound.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from ..config import TIERS


class Timescales:
    def __init__(self, history: int = 256) -> None:
        self.residences: dict[str, deque[int]] = {t: deque(maxlen=history) for t in TIERS}

    def left(self, tier: str, ticks: int) -> None:
        self.residences[tier].append(max(ticks, 1))

    def measure(self, tier: str, alive_ages: list[int]) -> float | None:
        done = self.residences[tier]
        if done:
            return float(statistics.median(done))
        return float(statistics.median(alive_ages)) if alive_ages else None

    def state(self) -> dict[str, Any]:
        return {t: list(v) for t, v in self.residences.items()}

    def restore(self, state: dict[str, Any]) -> None:
        for t, values in state.items():
            self.residences[t].extend(values)
