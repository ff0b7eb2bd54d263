"""A small exact nearest-neighbour index over unit vectors (cosine similarity by one matrix-vector product).

Rows live in a preallocated buffer that doubles when full; removed rows go on a free list and are masked, so
adding and removing are O(1) and a search touches only the live prefix of the buffer.
"""

from __future__ import annotations

import torch


class VectorIndex:
    def __init__(self, dim: int, capacity: int = 64) -> None:
        self.dim = dim
        self.vectors = torch.zeros(capacity, dim)
        self.live = torch.zeros(capacity, dtype=torch.bool)
        self.keys: list[str | None] = [None] * capacity
        self.slot: dict[str, int] = {}
        self.free: list[int] = []
        self.used = 0  # slots ever handed out (the searched prefix)

    def __len__(self) -> int:
        return len(self.slot)

    def add(self, key: str, vector: torch.Tensor) -> None:
        if vector.shape != (self.dim,):
            raise ValueError(f"semantic vector of shape {tuple(vector.shape)} for an index of dimension {self.dim}")
        if key in self.slot:
            self.remove(key)
        if self.free:
            i = self.free.pop()
        else:
            if self.used == len(self.keys):
                self._grow()
            i, self.used = self.used, self.used + 1
        self.vectors[i] = torch.nn.functional.normalize(vector.float(), dim=0)
        self.live[i] = True
        self.keys[i] = key
        self.slot[key] = i

    def remove(self, key: str) -> None:
        i = self.slot.pop(key, None)
        if i is not None:
            self.live[i] = False
            self.keys[i] = None
            self.free.append(i)

    def nearest(self, query: torch.Tensor) -> tuple[str, float] | None:
        """The live key with the highest cosine similarity to ``query``, and that similarity."""
        if not self.slot:
            return None
        q = torch.nn.functional.normalize(query.float(), dim=0)
        scores = self.vectors[: self.used] @ q
        scores = scores.masked_fill(~self.live[: self.used], float("-inf"))
        i = int(scores.argmax())
        return self.keys[i], float(scores[i])

    def _grow(self) -> None:
        n = len(self.keys)
        self.vectors = torch.cat([self.vectors, torch.zeros(n, self.dim)])
        self.live = torch.cat([self.live, torch.zeros(n, dtype=torch.bool)])
        self.keys.extend([None] * n)
