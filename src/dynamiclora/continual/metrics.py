"""Continual-learning metrics with the GEM (Lopez-Paz & Ranzato, 2017) and Avalanche definitions.

``R[j][i]`` is the accuracy on task i after learning task j (T tasks):

* ACC = mean_i R[T-1][i] — average accuracy at the end;
* BWT = mean_{i<T-1} (R[T-1][i] − R[i][i]) — backward transfer (negative: forgetting);
* forgetting = mean_{i<T-1} (max_{l<T-1} R[l][i] − R[T-1][i]) (Chaudhry et al., 2018);
* plasticity = mean_i R[i][i] — accuracy right after learning each task.
"""

from __future__ import annotations


def summarize(R: list[list[float]]) -> dict[str, float]:
    T = len(R)
    last = R[-1]
    out = {"acc": sum(last) / T, "plasticity": sum(R[i][i] for i in range(T)) / T}
    if T > 1:
        out["bwt"] = sum(last[i] - R[i][i] for i in range(T - 1)) / (T - 1)
        out["forgetting"] = sum(max(R[j][i] for j in range(i, T - 1)) - last[i] for i in range(T - 1)) / (T - 1)
    else:
        out["bwt"] = out["forgetting"] = 0.0
    return out
