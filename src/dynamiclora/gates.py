"""Gates: where a learned circuit acts. Pure data, part of the circuit's content.

A gate is a set of keys (route features of the prompts a circuit learned from) and, per key, a radius in the
features' own units. An input reaches the gate when its feature lies within a key's radius of that key. Both
are fixed numbers stored with the circuit and hashed with it: nothing outside the circuit (no statistic of other
agents, no configuration read later) decides where it acts, so a circuit acts the same wherever it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .circuits import tensor_digest
from .errors import InvalidInputError

MAX_KEYS = 16  # per gate; a circuit attributed more distinct prompts keeps the most recent ones


@dataclass(frozen=True)
class Gate:
    keys: torch.Tensor  # (k, d) float32 route features
    radii: torch.Tensor  # (k,) float32, in the features' units

    def __post_init__(self) -> None:
        if self.keys.dim() != 2 or self.radii.shape != (self.keys.shape[0],):
            raise InvalidInputError(
                f"a gate needs keys (k, d) and radii (k,), got {tuple(self.keys.shape)} and {tuple(self.radii.shape)}"
            )

    @classmethod
    def single(cls, feature: torch.Tensor, radius: float) -> Gate:
        return cls(feature.reshape(1, -1).float().cpu(), torch.tensor([float(radius)]))

    def distance(self, feature: torch.Tensor) -> float:
        """Distance to the nearest key in units of that key's radius: ≤ 1 means the input reaches the gate."""
        gaps = (self.keys - feature.reshape(1, -1).float()).norm(dim=-1) / self.radii.clamp_min(1e-12)
        return float(gaps.min())

    def with_key(self, feature: torch.Tensor, radius: float) -> Gate:
        """This gate plus one key (the oldest goes beyond ``MAX_KEYS``)."""
        keys = torch.cat([self.keys, feature.reshape(1, -1).float().cpu()])[-MAX_KEYS:]
        radii = torch.cat([self.radii, torch.tensor([float(radius)])])[-MAX_KEYS:]
        return Gate(keys, radii)

    def covers(self, other: Gate) -> bool:
        """Does this gate reach every input ``other`` reaches? (Sufficient test: each of other's keys is one of
        ours with at least its radius.)"""
        gaps = torch.cdist(other.keys, self.keys)  # (k_other, k_self)
        same = gaps <= 1e-6 * other.keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
        wide = self.radii.unsqueeze(0) >= other.radii.unsqueeze(1) * (1 - 1e-6)
        return bool((same & wide).any(dim=1).all())

    def digest(self, hasher: Any) -> None:
        tensor_digest(hasher, self.keys)
        tensor_digest(hasher, self.radii)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"route": self.keys.contiguous(), "radii": self.radii.contiguous()}


def covers(outer: Gate | None, inner: Gate | None) -> bool:
    """Does a circuit gated by ``outer`` act on every input one gated by ``inner`` acts on? (Ungated acts
    everywhere.)"""
    if outer is None:
        return True
    return inner is not None and outer.covers(inner)


def overlap(a: Gate | None, b: Gate | None) -> bool:
    """Is there an input that reaches both gates? (Some pair of keys whose balls meet; ungated reaches all.)"""
    if a is None or b is None:
        return True
    gaps = torch.cdist(a.keys, b.keys)
    return bool((gaps <= a.radii.unsqueeze(1) + b.radii.unsqueeze(0)).any())


def union(gates: list[Gate | None]) -> Gate | None:
    """The gate of a circuit made from others (a consensus, a residual): it acts wherever any of them did; None
    (ungated, acts everywhere) if any of them is ungated. Equal keys keep the widest radius."""
    if not gates or any(g is None for g in gates):
        return None
    keys = torch.cat([g.keys for g in gates])
    radii = torch.cat([g.radii for g in gates])
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    widest = torch.zeros(unique.shape[0]).scatter_reduce(0, inverse, radii, reduce="amax", include_self=False)
    return Gate(unique, widest)
