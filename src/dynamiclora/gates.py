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


Owners = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Gate:
    keys: torch.Tensor  # (k, d) float32 route features
    radii: torch.Tensor  # (k,) float32, in the features' units
    # per key, the agents whose prompts put it there (empty: not recorded, as in states saved before owners were);
    # it decides what forgetting an agent or a prompt may remove, never where the gate acts, so it is not hashed
    owners: Owners = ()

    def __post_init__(self) -> None:
        if self.keys.dim() != 2 or self.radii.shape != (self.keys.shape[0],):
            raise InvalidInputError(
                f"a gate needs keys (k, d) and radii (k,), got {tuple(self.keys.shape)} and {tuple(self.radii.shape)}"
            )
        if self.owners and len(self.owners) != self.keys.shape[0]:
            raise InvalidInputError(f"a gate of {self.keys.shape[0]} keys has {len(self.owners)} owner entries")

    @classmethod
    def single(cls, feature: torch.Tensor, radius: float, owner: str | None = None) -> Gate:
        owners = ((owner,),) if owner is not None else ()
        return cls(feature.reshape(1, -1).float().cpu(), torch.tensor([float(radius)]), owners)

    def owner_of(self, i: int) -> tuple[str, ...]:
        return self.owners[i] if self.owners else ()

    def reached_by(self, feature: torch.Tensor) -> torch.Tensor:
        """(k,) bool: which keys this input reaches."""
        gaps = (self.keys - feature.reshape(1, -1).float()).norm(dim=-1) / self.radii.clamp_min(1e-12)
        return gaps <= 1.0

    def keeping(self, keep: torch.Tensor, owners: Owners | None = None) -> Gate | None:
        """This gate with only the keys where ``keep`` (k,) is true (and ``owners`` for them, if given); None when
        no key is left. None here means nothing is left to act, not "ungated": the caller removes the circuit."""
        if not bool(keep.any()):
            return None
        index = keep.nonzero().flatten().tolist()
        kept = owners if owners is not None else tuple(self.owners[i] for i in index) if self.owners else ()
        return Gate(self.keys[keep], self.radii[keep], kept)

    def distance(self, feature: torch.Tensor) -> float:
        """Distance to the nearest key in units of that key's radius: ≤ 1 means the input reaches the gate."""
        gaps = (self.keys - feature.reshape(1, -1).float()).norm(dim=-1) / self.radii.clamp_min(1e-12)
        return float(gaps.min())

    def with_key(self, feature: torch.Tensor, radius: float, owner: str | None = None) -> Gate:
        """This gate plus one key (the oldest goes beyond ``MAX_KEYS``)."""
        keys = torch.cat([self.keys, feature.reshape(1, -1).float().cpu()])[-MAX_KEYS:]
        radii = torch.cat([self.radii, torch.tensor([float(radius)])])[-MAX_KEYS:]
        owners = ()
        if owner is not None:
            known = self.owners or tuple(() for _ in range(self.keys.shape[0]))
            owners = (*known, (owner,))[-MAX_KEYS:]
        return Gate(keys, radii, owners)

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

    @classmethod
    def restore(cls, keys: torch.Tensor, radii: torch.Tensor, record: dict[str, Any]) -> Gate:
        """A gate from its stored tensors and its circuit's record (which holds the owners)."""
        return cls(keys, radii, tuple(tuple(o) for o in record.get("gate_owners", [])))

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
    owners: list[set[str]] = [set() for _ in range(unique.shape[0])]
    each = [g.owner_of(i) for g in gates for i in range(g.keys.shape[0])]
    for j, who in zip(inverse.tolist(), each):
        owners[j].update(who)
    recorded = any(g.owners for g in gates)
    return Gate(unique, widest, tuple(tuple(sorted(o)) for o in owners) if recorded else ())
