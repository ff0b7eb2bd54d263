"""The autocorrelation detector: does a usage series recur over time, rather than come in a burst or at random?

A series is a circuit's use per tick (1 if it was used in that tick, else 0). Over the last ``window``
ticks a pattern qualifies when

* it covers the window: at least ``min_coverage`` of ``blocks`` equal sub-windows hold a use (by default
  all of them: a burst leaves some empty), and
* it recurs with structure: for some lag k ≤ window/4 the autocorrelation at k *and* at 2k both exceed
  ``max(min_autocorrelation, 2.5/√(n−lag))``, i.e. stand well above what independent noise gives (its
  autocorrelation at any lag is about N(0, 1/(n−lag))). Requiring the multiple 2k too makes a chance
  excursion at one lag (a false positive of noise) about a thousand times rarer.

A series used in every tick (zero variance) is the limit of recurrence and qualifies. Frequency alone
decides nothing: the same number of uses packed into a burst, or spread at random, does not qualify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Persistence:
    uses: int
    coverage: float  # fraction of sub-windows holding a use
    autocorrelation: float  # the smaller of r(k), r(2k) at the best lag k (1.0 for a constant used series)
    lag: int  # the best lag (0 when none)
    qualifies: bool

    @property
    def score(self) -> float:
        """Stability: what orders the migration queue."""
        return self.coverage * max(self.autocorrelation, 0.0)


def autocorrelation(x: list[float], lag: int) -> float:
    """Unbiased normalized autocorrelation of x at ``lag``."""
    centred, var = _centre(x)
    return _autocorrelation(centred, var, lag)


def _centre(x: list[float]) -> tuple[list[float], float]:
    mean = sum(x) / len(x)
    centred = [v - mean for v in x]
    return centred, sum(v * v for v in centred) / len(x)


def _autocorrelation(centred: list[float], var: float, lag: int) -> float:
    n = len(centred)
    if lag <= 0 or lag >= n or var == 0:
        return 0.0
    return sum(centred[t] * centred[t + lag] for t in range(n - lag)) / (n - lag) / var


def persistence(
    series: list[int], window: int, blocks: int, min_coverage: float, min_autocorrelation: float
) -> Persistence:
    x = [float(v) for v in series[-window:]]
    n = len(x)
    uses = int(sum(x))
    if n < window or uses == 0:
        return Persistence(uses, 0.0, 0.0, 0, False)
    size = n / blocks
    covered = sum(1 for b in range(blocks) if any(x[int(b * size) : int((b + 1) * size)]))
    coverage = covered / blocks
    if uses == n:  # used in every tick: perfectly persistent
        return Persistence(uses, coverage, 1.0, 1, coverage >= min_coverage)
    centred, var = _centre(x)  # once per series, not once per lag
    best, best_lag = 0.0, 0
    for lag in range(1, n // 4 + 1):
        r = min(_autocorrelation(centred, var, lag), _autocorrelation(centred, var, 2 * lag))
        bound = max(min_autocorrelation, 2.5 / math.sqrt(n - 2 * lag))
        if r >= bound and r > best + 0.05:  # a multiple of the period must be clearly better to win
            best, best_lag = r, lag
    qualifies = coverage >= min_coverage and best_lag > 0 and uses >= blocks
    return Persistence(uses, coverage, best, best_lag, qualifies)
