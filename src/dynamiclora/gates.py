"""Gates: where a learned circuit acts. Pure data, part of the circuit's content.

A gate is a set of keys (route features of the prompts a circuit learned from) and, per key, a radius. Both are
fixed numbers stored with the circuit and hashed with it: nothing outside the circuit (no statistic of other
agents, no configuration read later) decides where it acts, so a circuit acts the same wherever it goes.

Two kinds, one per routing mode (``LearningConfig.route_match``):

- *pooled* (``groups`` None): a key is a prompt's pooled route feature, and an input reaches it when its own
  pooled feature lies within the key's radius (Euclidean, in the features' units). Rewording a fact moves the
  pooled feature as far as the same template about another entity does, so a pooled gate either misses the
  paraphrases or reaches the neighbours.
- *token* (``groups`` given): a prototype is the few token states of a taught prompt most unlike every token of
  fixed background prompts (a fictional name, a rare identifier: what the fact is about), unit-norm; an input's
  feature is its own token states. Each key is matched by its best cosine over the input's tokens, and the input
  reaches the prototype when the keys' mean match is at least the prototype's threshold (kept in ``radii``, the
  same for every key of a prototype). A *strict* prototype (``strict``) takes its keys' lowest match instead of
  their mean: every key must be matched, so a name that shares two of three distinctive pieces with a taught one
  does not reach it. An *ordered* prototype (``ordered``) matches its keys, which are kept in the order of their
  tokens in the taught prompt, at increasing positions of the input: the best such path, not each key's best
  token anywhere, so the pieces of a name matched in another order (``Velmun Belvelnix`` for ``Belvelmun``) do
  not add up to it. Rewording, a line before, a chat template or other spacing keep the fact's distinctive
  tokens, in their order; a neighbour (the template about another entity) and unrelated inputs lack them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .circuits import tensor_digest
from .errors import InvalidInputError

MAX_KEYS = 16  # per gate (token gates: prototypes); a circuit attributed more prompts keeps the most recent ones
THRESHOLD_MARGIN = 0.02  # token gates: a threshold set against a prompt lies this far above that prompt's match
THRESHOLD_CAP = 0.995  # token gates: no threshold above this (a prompt's own variants must still reach it)
Owners = tuple[tuple[str, ...], ...]
FLAGS = ("strict", "ordered")  # a token gate's per-key flags (see Gate), each None where no key has it


@dataclass(frozen=True)
class Gate:
    keys: torch.Tensor  # (k, d) float32 route features (token gates: unit-norm token states)
    radii: torch.Tensor  # (k,) float32 radii in the features' units (token gates: each key's prototype threshold)
    # per key, the agents whose prompts put it there (empty: not recorded, as in states saved before owners were);
    # it decides what forgetting an agent or a prompt may remove, never where the gate acts, so it is not hashed
    owners: Owners = ()
    groups: torch.Tensor | None = None  # (k,) int64: token gates, each key's prototype; None: a pooled gate
    strict: torch.Tensor | None = None  # (k,) bool: token gates, whether each key's prototype needs every key matched
    ordered: torch.Tensor | None = None  # (k,) bool: token gates, whether each key's prototype matches keys in order

    def __post_init__(self) -> None:
        if self.keys.dim() != 2 or self.radii.shape != (self.keys.shape[0],):
            raise InvalidInputError(
                f"a gate needs keys (k, d) and radii (k,), got {tuple(self.keys.shape)} and {tuple(self.radii.shape)}"
            )
        if self.owners and len(self.owners) != self.keys.shape[0]:
            raise InvalidInputError(f"a gate of {self.keys.shape[0]} keys has {len(self.owners)} owner entries")
        if self.groups is not None and self.groups.shape != (self.keys.shape[0],):
            raise InvalidInputError(f"a token gate of {self.keys.shape[0]} keys has groups {tuple(self.groups.shape)}")
        for name in FLAGS:
            flags = getattr(self, name)
            if flags is not None and (self.groups is None or flags.shape != (self.keys.shape[0],)):
                raise InvalidInputError(f"only a token gate is {name}, with one flag per key")

    @property
    def tokens(self) -> bool:
        return self.groups is not None

    @functools.cached_property
    def prototype_index(self) -> torch.Tensor:
        """(k,) token gates: each key's prototype numbered 0 … G-1 (kept once computed: a gate never changes)."""
        return torch.unique(self.groups, return_inverse=True)[1]

    @functools.cached_property
    def prototypes(self) -> Prototypes:
        """Token gates: per prototype, its number of keys, its threshold and whether it is strict and ordered (see
        :func:`_prototypes`), kept once computed."""
        return _prototypes(self.prototype_index, self.radii, self.strict, self.ordered)

    @classmethod
    def single(cls, feature: torch.Tensor, radius: float, owner: str | None = None) -> Gate:
        """A pooled gate of one key."""
        owners = ((owner,),) if owner is not None else ()
        return cls(feature.reshape(1, -1).float().cpu(), torch.tensor([float(radius)]), owners)

    @classmethod
    def prototype(
        cls,
        keys: torch.Tensor,
        threshold: float,
        owner: str | None = None,
        strict: bool = False,
        ordered: bool = False,
    ) -> Gate:
        """A token gate of one prototype: ``keys`` (k, d) unit-norm token states, reached at mean match (``strict``:
        lowest match) at least ``threshold``; ``ordered``: matched at increasing positions, in the keys' order."""
        k = keys.shape[0]
        owners = ((owner,),) * k if owner is not None else ()
        flags = torch.ones(k, dtype=torch.bool) if strict else None
        order = torch.ones(k, dtype=torch.bool) if ordered else None
        groups = torch.zeros(k, dtype=torch.long)
        return cls(keys.float().cpu(), torch.full((k,), float(threshold)), owners, groups, flags, order)

    def flag(self, name: str) -> torch.Tensor:
        """(k,) bool: the per-key flag ``name`` (one of ``FLAGS``), or all false."""
        flags = getattr(self, name)
        return flags if flags is not None else torch.zeros(self.keys.shape[0], dtype=torch.bool)

    def owner_of(self, i: int) -> tuple[str, ...]:
        return self.owners[i] if self.owners else ()

    def _distances(self, feature: torch.Tensor) -> torch.Tensor:
        """(k,) each key's distance to this input in units of its radius (token gates: its prototype's)."""
        if not self.tokens:
            return (self.keys - feature.reshape(1, -1).float()).norm(dim=-1) / self.radii.clamp_min(1e-12)
        index = self.prototype_index
        return _prototype_distances(self.keys, index, self.prototypes, feature)[index]

    def distance(self, feature: torch.Tensor) -> float:
        """Distance to the nearest key (token gates: prototype) in units of its radius: ≤ 1 means the input
        reaches the gate. ``feature``: the input's pooled feature (d,), or for token gates its token states (T, d)."""
        return float(self._distances(feature).min())

    def reached_by(self, feature: torch.Tensor) -> torch.Tensor:
        """(k,) bool: which keys this input reaches (token gates: every key of each prototype it reaches)."""
        return self._distances(feature) <= 1.0

    def excluding(self, feature: torch.Tensor) -> Gate:
        """Token gates: this gate with each prototype that ``feature`` (an input's token states) reaches raised to
        ``THRESHOLD_MARGIN`` above that input's match (at most ``THRESHOLD_CAP``); the others as they are."""
        if not self.tokens:
            raise InvalidInputError("only a token gate can be raised above an input")
        index = self.prototype_index
        threshold = self.prototypes.threshold
        score = _prototype_scores(self.keys, index, self.prototypes, feature)
        raised = torch.where(score >= threshold, (score + THRESHOLD_MARGIN).clamp(max=THRESHOLD_CAP), threshold)
        return Gate(self.keys, raised.maximum(threshold)[index], self.owners, self.groups, self.strict, self.ordered)

    def keeping(self, keep: torch.Tensor, owners: Owners | None = None) -> Gate | None:
        """This gate with only the keys where ``keep`` (k,) is true (and ``owners`` for them, if given); None when
        no key is left. None here means nothing is left to act, not "ungated": the caller removes the circuit."""
        if not bool(keep.any()):
            return None
        index = keep.nonzero().flatten().tolist()
        kept = owners if owners is not None else tuple(self.owners[i] for i in index) if self.owners else ()
        groups = None if self.groups is None else torch.unique(self.groups[keep], return_inverse=True)[1]
        flags = {n: None if getattr(self, n) is None else getattr(self, n)[keep] for n in FLAGS}
        return Gate(self.keys[keep], self.radii[keep], kept, groups, **flags)

    def with_key(
        self,
        feature: torch.Tensor,
        radius: float,
        owner: str | None = None,
        strict: bool = False,
        ordered: bool = False,
    ) -> Gate:
        """This gate plus one key at ``radius`` (token gates: one prototype, ``feature`` its keys (k, d) and
        ``radius`` its threshold, ``strict`` whether it needs every key, ``ordered`` whether in their order); the
        oldest go beyond ``MAX_KEYS`` keys (token gates: prototypes)."""
        new = feature.reshape(-1, self.keys.shape[1]).float().cpu()
        keys = torch.cat([self.keys, new])
        radii = torch.cat([self.radii, torch.full((new.shape[0],), float(radius))])
        owners: Owners = ()
        if owner is not None:
            known = self.owners or tuple(() for _ in range(self.keys.shape[0]))
            owners = (*known, *(((owner,),) * new.shape[0]))
        groups, flags = None, {}
        if self.groups is not None:
            groups = torch.cat([self.groups, torch.full((new.shape[0],), int(self.groups.max()) + 1)])
            alive = groups > int(groups.max()) - MAX_KEYS  # the newest MAX_KEYS prototypes
            for name, on in zip(FLAGS, (strict, ordered)):
                if on or getattr(self, name) is not None:
                    flags[name] = torch.cat([self.flag(name), torch.full((new.shape[0],), bool(on))])
        else:
            alive = torch.arange(keys.shape[0]) >= keys.shape[0] - MAX_KEYS
        gate = Gate(keys, radii, owners, groups, **flags)
        return gate if bool(alive.all()) else gate.keeping(alive)

    def covers(self, other: Gate) -> bool:
        """Does this gate reach every input ``other`` reaches? (Sufficient test: each of other's keys is one of
        ours with at least its reach: a radius as wide, a threshold as low.)"""
        if self.tokens != other.tokens:
            return False
        gaps = torch.cdist(other.keys, self.keys)  # (k_other, k_self)
        same = gaps <= 1e-6 * other.keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.tokens:  # (and as strict or less, as ordered or less: either reaches less than a mean one)
            wide = self.radii.unsqueeze(0) <= other.radii.unsqueeze(1) + 1e-6
            for name in FLAGS:
                wide &= ~self.flag(name).unsqueeze(0) | other.flag(name).unsqueeze(1)
        else:
            wide = self.radii.unsqueeze(0) >= other.radii.unsqueeze(1) * (1 - 1e-6)
        return bool((same & wide).any(dim=1).all())

    def digest(self, hasher: Any) -> None:
        tensor_digest(hasher, self.keys)
        tensor_digest(hasher, self.radii)
        if self.groups is not None:  # a token gate: its keys mean something else
            hasher.update(b"tokens")
            tensor_digest(hasher, self.groups)
        for name in FLAGS:  # (a gate with no key flagged hashes as before the flag was)
            flags = getattr(self, name)
            if flags is not None and bool(flags.any()):
                hasher.update(name.encode())
                tensor_digest(hasher, flags.to(torch.uint8))

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> Gate:
        """A gate from its tensors (as :meth:`to_tensors` gives them) and its circuit's record (which holds the
        owners)."""
        owners = tuple(tuple(o) for o in record.get("gate_owners", []))
        groups = tensors.get("groups")
        flags = {n: tensors[n] > 0.5 for n in FLAGS if n in tensors}
        return cls(tensors["route"], tensors["radii"], owners, None if groups is None else groups.long(), **flags)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"route": self.keys.contiguous(), "radii": self.radii.contiguous()}
        if self.groups is not None:
            out["groups"] = self.groups.contiguous()
        for name in FLAGS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).contiguous()
        return out


class TokenGateIndex:
    """Many token gates matched at once: every key in one matrix, so that routing a prompt among a thousand learned
    circuits is one matrix product and a few scatters, not a thousand small ones. Computes what
    :meth:`Gate.reached_by` computes per gate (up to the rounding of a larger product)."""

    def __init__(self, gates: list[Gate]) -> None:
        if not all(g.tokens for g in gates):
            raise InvalidInputError("TokenGateIndex takes token gates only")
        self.size = len(gates)
        self.keys = torch.cat([g.keys for g in gates]) if gates else torch.zeros(0, 0)
        strict, ordered = (
            torch.cat([g.flag(n) for g in gates]) if any(getattr(g, n) is not None for g in gates) else None
            for n in FLAGS
        )
        offsets, owner, groups = 0, [], []
        for i, g in enumerate(gates):
            groups.append(g.prototype_index + offsets)
            count = len(g.prototypes.sizes)
            owner += [i] * count
            offsets += count
        self.groups = torch.cat(groups) if gates else torch.zeros(0, dtype=torch.long)
        self.owner = torch.tensor(owner, dtype=torch.long)  # (G,) the gate of each prototype
        radii = torch.cat([g.radii for g in gates]) if gates else torch.zeros(0)
        self.prototypes = _prototypes(self.groups, radii, strict, ordered)

    def reached(self, feature: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
        """(gates,) bool: which gates this input's token states (T, d) reach; ``slack``: with every prototype's
        score counted this much higher (negative: lower)."""
        return self.reached_within(feature, (slack,))[0]

    def distances(self, feature: torch.Tensor) -> torch.Tensor:
        """(gates,) each gate's distance to an input's token states (T, d): its nearest prototype's, in units of
        that prototype's threshold, as :meth:`Gate.distance` gives it per gate (up to rounding)."""
        if self.size == 0:
            return torch.zeros(0)
        distance = _prototype_distances(self.keys, self.groups, self.prototypes, feature)
        nearest = torch.full((self.size,), float("inf"))
        return nearest.scatter_reduce(0, self.owner, distance, reduce="amin", include_self=True)

    def reached_within(self, feature: torch.Tensor, slacks: tuple[float, ...]) -> torch.Tensor:
        """(len(slacks), gates) bool: :meth:`reached` at each slack, the input matched once."""
        if self.size == 0:
            return torch.zeros(len(slacks), 0, dtype=torch.bool)
        distance = _prototype_distances(self.keys, self.groups, self.prototypes, feature)
        room = (1.0 - self.prototypes.threshold).clamp_min(1e-6)
        near = torch.stack([distance <= 1.0 + slack / room for slack in slacks])
        return torch.zeros(len(slacks), self.size).index_add_(1, self.owner, near.float()) > 0


class Prototypes(NamedTuple):
    """Per prototype of a token gate (or of many, see :class:`TokenGateIndex`): its number of keys (``sizes``),
    its threshold, and whether it is strict and whether ordered (None: none is)."""

    sizes: torch.Tensor
    threshold: torch.Tensor
    strict: torch.Tensor | None
    ordered: torch.Tensor | None


def _prototypes(
    groups: torch.Tensor, radii: torch.Tensor, strict: torch.Tensor | None = None, ordered: torch.Tensor | None = None
) -> Prototypes:
    """Per prototype (``groups``: each key's prototype, 0 … G-1): see :class:`Prototypes`."""
    size = int(groups.max()) + 1 if groups.numel() else 0
    count = torch.zeros(size).index_add_(0, groups, torch.ones(len(groups)))
    threshold = torch.zeros(size).scatter_reduce(0, groups, radii, reduce="amin", include_self=False)

    def flags(per_key: torch.Tensor | None) -> torch.Tensor | None:
        if per_key is None or not bool(per_key.any()):
            return None
        return torch.zeros(size).scatter_reduce(0, groups, per_key.float(), reduce="amax", include_self=False) > 0.5

    return Prototypes(count, threshold, flags(strict), flags(ordered))


def _prototype_distances(
    keys: torch.Tensor, groups: torch.Tensor, prototypes: Prototypes, feature: torch.Tensor
) -> torch.Tensor:
    """(G,) each prototype's distance to an input's token states (T, d), in units of its threshold: its match
    (see :func:`_prototype_scores`) as ``(1 - match) / (1 - threshold)``; at most 1 where the input reaches it."""
    score = _prototype_scores(keys, groups, prototypes, feature)
    return (1.0 - score).clamp_min(0.0) / (1.0 - prototypes.threshold).clamp_min(1e-6)


def _prototype_scores(
    keys: torch.Tensor, groups: torch.Tensor, prototypes: Prototypes, feature: torch.Tensor
) -> torch.Tensor:
    """(G,) each prototype's match to an input's token states (T, d): its keys' best cosines over the tokens,
    averaged over the prototype's keys (a strict prototype: their lowest; an ordered one: over the best path of
    increasing positions)."""
    count, strict, ordered = prototypes.sizes, prototypes.strict, prototypes.ordered
    cosines = keys @ feature.float().T  # (k, T)
    best = cosines.max(dim=1).values  # each key's best match among the input's tokens
    score = torch.zeros(len(count)).index_add_(0, groups, best) / count
    if strict is not None:
        lowest = torch.full((len(count),), 2.0).scatter_reduce(0, groups, best, reduce="amin", include_self=True)
        score = torch.where(strict, lowest, score)
    if ordered is not None:
        score = torch.where(ordered, _in_order(cosines, groups, count, strict), score)
    return score


def _in_order(
    cosines: torch.Tensor, groups: torch.Tensor, count: torch.Tensor, strict: torch.Tensor | None
) -> torch.Tensor:
    """(G,) each prototype's match when its keys (in their rows' order) must be matched at increasing positions:
    the best such path's mean cosine (strict: its lowest), by dynamic programming over the keys' ranks; -inf where
    the input has fewer tokens than the prototype keys."""
    rows = torch.sort(groups, stable=True).indices  # each prototype's keys together, in their order
    group = groups[rows]
    starts = torch.ones(len(rows), dtype=torch.bool)
    starts[1:] = group[1:] != group[:-1]
    position = torch.arange(len(rows))
    rank = position - torch.where(starts, position, 0).cummax(dim=0).values
    lowest = strict[group] if strict is not None else torch.zeros(len(rows), dtype=torch.bool)
    sims = cosines[rows]
    path = torch.empty_like(sims)  # best path through this key at a position at or before each token
    for r in range(int(rank.max()) + 1 if len(rows) else 0):
        at = (rank == r).nonzero().flatten()
        if r == 0:
            path[at] = sims[at].cummax(dim=1).values
            continue
        before = torch.full_like(sims[at], float("-inf"))
        before[:, 1:] = path[at - 1][:, :-1]  # the previous key matched strictly earlier
        step = torch.where(lowest[at, None], torch.minimum(before, sims[at]), before + sims[at])
        path[at] = step.cummax(dim=1).values
    ends = torch.ones(len(rows), dtype=torch.bool)
    ends[:-1] = group[1:] != group[:-1]
    total = torch.zeros(len(count)).index_copy_(0, group[ends], path[ends, -1])
    return total / count if strict is None else torch.where(strict, total, total / count)


def covers(outer: Gate | None, inner: Gate | None) -> bool:
    """Does a circuit gated by ``outer`` act on every input one gated by ``inner`` acts on? (Ungated acts
    everywhere.)"""
    if outer is None:
        return True
    return inner is not None and outer.covers(inner)


def overlap(a: Gate | None, b: Gate | None) -> bool:
    """Is there an input that reaches both gates? (Pooled: some pair of keys whose balls meet. Token gates: a
    prototype of each that reaches the other's keys read as an input's tokens. Ungated reaches all.)"""
    if a is None or b is None or a.tokens != b.tokens:
        return True  # (different feature spaces: assume they may meet)
    if a.tokens:
        groups_a, groups_b = a.groups.unique().tolist(), b.groups.unique().tolist()
        return any(
            a.distance(b.keys[b.groups == g]) <= 1.0 and b.distance(a.keys[a.groups == h]) <= 1.0
            for g in groups_b
            for h in groups_a
        )
    gaps = torch.cdist(a.keys, b.keys)
    return bool((gaps <= a.radii.unsqueeze(1) + b.radii.unsqueeze(0)).any())


def union(gates: list[Gate | None]) -> Gate | None:
    """The gate of a circuit made from others (a consensus, a residual): it acts wherever any of them did; None
    (ungated, acts everywhere) if any of them is ungated. Equal keys keep the widest radius."""
    if not gates or any(g is None for g in gates):
        return None
    if any(g.tokens for g in gates):
        return _token_union(gates)
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


def _token_union(gates: list[Gate]) -> Gate:
    """Token gates' union: every distinct prototype once (equal keys: the lowest threshold, the owners merged)."""
    if not all(g.tokens for g in gates):
        raise InvalidInputError("cannot merge token gates with pooled ones; both sides must route the same way")
    seen: dict[bytes, int] = {}
    protos: list[list] = []  # [keys, threshold, owners, strict, ordered]
    for g in gates:
        for group in g.groups.unique().tolist():
            rows = (g.groups == group).nonzero().flatten().tolist()
            keys, who = g.keys[rows], set().union(*(g.owner_of(i) for i in rows))
            strict, ordered = (bool(g.flag(n)[rows[0]]) for n in FLAGS)
            sig = keys.numpy().tobytes() + bytes([strict, ordered])
            if sig in seen:
                p = protos[seen[sig]]
                p[1], p[2] = min(p[1], float(g.radii[rows[0]])), p[2] | who
            else:
                seen[sig] = len(protos)
                protos.append([keys, float(g.radii[rows[0]]), who, strict, ordered])
    keys = torch.cat([p[0] for p in protos])
    radii = torch.cat([torch.full((p[0].shape[0],), p[1]) for p in protos])
    groups = torch.cat([torch.full((p[0].shape[0],), i, dtype=torch.long) for i, p in enumerate(protos)])
    recorded = any(g.owners for g in gates)
    owners = tuple(tuple(sorted(p[2])) for p in protos for _ in range(p[0].shape[0])) if recorded else ()

    def flags(which: int) -> torch.Tensor | None:
        if not any(p[which] for p in protos):
            return None
        return torch.cat([torch.full((p[0].shape[0],), p[which]) for p in protos])

    return Gate(keys, radii, owners, groups, flags(3), flags(4))
