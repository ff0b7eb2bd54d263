"""Circuits: the unit of memory.

A circuit holds, for every adapted module m, low-rank factors ``A_m (r × in)`` and ``B_m (out × r)``
and a scale ``s``; its delta on module m is ``s · B_m A_m``. A circuit moves between tiers whole.
Factors are kept in float32 whatever the base model's dtype: deltas are computed in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .gates import Gate

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))


def new_circuit_id() -> str:
    return uuid.uuid4().hex[:16]


def tensor_digest(hasher: Any, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and exact bytes to a hashlib object."""
    t = tensor.detach().contiguous().cpu()
    hasher.update(str(t.dtype).encode())
    hasher.update(struct.pack(f"<{t.dim()}q", *t.shape))
    hasher.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


@dataclass
class Circuit:
    """Low-rank factors on every adapted module plus the record that tracks the circuit's life."""

    factors: Factors
    tier: str
    scope: str
    scale: float = 1.0
    id: str = field(default_factory=new_circuit_id)
    label: str = ""
    origin_agents: list[str] = field(default_factory=list)
    origin_interactions: list[int] = field(default_factory=list)
    created_tick: int = 0
    updated_tick: int = 0
    usage: float = 0.0  # last observed normalized activation
    critical: bool = False  # learned with critical=True
    history: list[dict[str, Any]] = field(default_factory=list)
    # memory dynamics (see dynamics.py): phase, usage statistic, per-tick use series, strength reference
    phase: str = "FREE"
    u: float = 0.0
    series: list[int] = field(default_factory=list)  # 1 per tick in which the circuit was used, else 0
    uses_this_tick: int = 0
    entered_tick: int = 0  # tick at which it entered its current tier
    scale_on_entry: float = 0.0  # scale when it entered its tier (strength = scale / scale_on_entry)
    vigor: float = 1.0  # strength before rounding to a step: decays every unused tick (see dynamics.memory)
    last_loss: float | None = None  # completion loss after its last update
    key_self: float | None = None  # its key's activation on the inputs it was made from (attribution reference)
    examples: list[list] = field(default_factory=list)  # [activation, prompt, completion] that activate it most
    extracted: dict[str, Any] = field(default_factory=dict)  # summary of its extracted neuron circuit (WaveGen)
    residual_of: str = ""  # the shared scope whose consensus left this circuit behind (never proposed there again)
    gate: Gate | None = None  # where it acts (see gates.py); None: ungated, acts on every input
    pinned: bool = False  # imported or added by hand: never decays, never forgotten (remove it explicitly)

    def observe_example(self, activation: float, prompt: str, completion: str, keep: int = 3) -> None:
        """Remember the interactions that activate the circuit most; its label is the strongest one."""
        if not any(e[1] == prompt and e[2] == completion for e in self.examples):
            self.examples.append([round(float(activation), 4), prompt, completion])
        self.examples.sort(key=lambda e: -e[0])
        del self.examples[keep:]
        top = self.examples[0]
        head = " ".join(top[2].split())[:30]
        self.label = f"{' '.join(top[1].split())[:40]} → {head}" if head else top[1][:60]

    @property
    def strength(self) -> float:
        return abs(self.scale / self.scale_on_entry) if self.scale_on_entry else 1.0

    def __post_init__(self) -> None:
        for name, (a, b) in self.factors.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidInputError(
                    f"circuit {self.id}: factors of {name!r} must be A (r × in) and B (out × r) with equal r, "
                    f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
                )

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values())

    def delta(self, module: str) -> torch.Tensor:
        """Dense ``s · B A`` of one module (out × in), for tests and merging."""
        a, b = self.factors[module]
        return self.scale * (b.float() @ a.float())

    def content_hash(self) -> str:
        """sha256 over the scale, every module's factors (modules in sorted order) and, if gated, the gate."""
        h = hashlib.sha256()
        h.update(struct.pack("<d", float(self.scale)))
        for name in sorted(self.factors):
            a, b = self.factors[name]
            h.update(name.encode())
            tensor_digest(h, a)
            tensor_digest(h, b)
        if self.gate is not None:  # the gate decides where the circuit acts: part of what it computes
            h.update(b"gate")
            self.gate.digest(h)
        return h.hexdigest()

    def record(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready data."""
        return {
            "id": self.id,
            "tier": self.tier,
            "scope": self.scope,
            "scale": self.scale,
            "rank": self.rank,
            "label": self.label,
            "origin_agents": list(self.origin_agents),
            "origin_interactions": list(self.origin_interactions),
            "created_tick": self.created_tick,
            "updated_tick": self.updated_tick,
            "usage": self.usage,
            "critical": self.critical,
            "history": list(self.history),
            "phase": self.phase,
            "u": self.u,
            "series": list(self.series),
            "uses_this_tick": self.uses_this_tick,
            "entered_tick": self.entered_tick,
            "scale_on_entry": self.scale_on_entry,
            "vigor": self.vigor,
            "strength": self.strength,
            "last_loss": self.last_loss,
            "key_self": self.key_self,
            "examples": [list(e) for e in self.examples],
            "extracted": dict(self.extracted),
            "residual_of": self.residual_of,
            "pinned": self.pinned,
            "gated": self.gate is not None,
            "gate_owners": [list(o) for o in self.gate.owners] if self.gate is not None else [],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], factors: Factors) -> Circuit:
        keys = {f.name for f in dataclasses.fields(cls)} - {"factors", "gate"}  # rank, strength are derived
        return cls(factors=factors, **{k: record[k] for k in keys if k in record})


def frobenius_inner(c1: Circuit, c2: Circuit) -> float:
    """⟨s₁B₁A₁, s₂B₂A₂⟩ summed over shared modules, without forming a dense matrix.

    ``⟨B₁A₁, B₂A₂⟩ = sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ))``: two r×r products per module.
    """
    total = 0.0
    for name in c1.factors.keys() & c2.factors.keys():
        a1, b1 = c1.factors[name]
        a2, b2 = c2.factors[name]
        total += float(((b1.float().T @ b2.float()) * (a1.float() @ a2.float().T)).sum())
    return c1.scale * c2.scale * total


def inner_products(xs: list[Circuit], ys: list[Circuit]) -> torch.Tensor:
    """``G[i, j] = ⟨s_i B_i A_i, s_j B_j A_j⟩`` (float64, CPU) for every pair: :func:`frobenius_inner`, all at once.

    Per module, the circuits that cover it are stacked (ranks zero-padded, which adds nothing) and the two r×r
    products come from two einsums over the whole set."""
    g = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    modules = sorted({m for c in xs for m in c.factors} & {m for c in ys for m in c.factors})
    for name in modules:
        left = [(i, c) for i, c in enumerate(xs) if name in c.factors]
        right = [(j, c) for j, c in enumerate(ys) if name in c.factors]
        if not left or not right:
            continue
        a_left, b_left = _stacked(name, [c for _, c in left])  # (k, r, in), (k, out, r)
        a_right, b_right = _stacked(name, [c for _, c in right])
        bb = torch.einsum("kor,los->klrs", b_left, b_right)
        aa = torch.einsum("krd,lsd->klrs", a_left, a_right)
        rows = torch.tensor([i for i, _ in left])[:, None]
        cols = torch.tensor([j for j, _ in right])[None, :]
        g[rows, cols] += (bb * aa).sum((2, 3)).cpu()
    return g


def _stacked(name: str, circuits: list[Circuit]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, r, in) and s·B (k, out, r) of these circuits on one module, float64, ranks zero-padded to the largest."""
    r = max(c.factors[name][0].shape[0] for c in circuits)
    a0, b0 = circuits[0].factors[name]
    a = torch.zeros(len(circuits), r, a0.shape[1], dtype=torch.float64, device=a0.device)
    b = torch.zeros(len(circuits), b0.shape[0], r, dtype=torch.float64, device=a0.device)
    for k, c in enumerate(circuits):
        ca, cb = c.factors[name]
        a[k, : ca.shape[0]] = ca.detach().double()
        b[k, :, : cb.shape[1]] = cb.detach().double() * c.scale
    return a, b


def concat_factors(
    circuits: list[Circuit],
    module: str,
    in_features: int,
    out_features: int,
    dtype: torch.dtype | None = None,
    ranks: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack circuits along the rank axis with their scales folded into B.

    Returns ``A_cat (R, in)`` and ``B_cat (out, R)`` such that ``B_cat A_cat = Σ s·B A``. A circuit that does
    not cover ``module`` contributes zero columns of its rank, so rank offsets agree across modules. ``ranks``:
    the circuits' ranks, when the caller has them (one stack per module: not recounted for each).
    """
    a_parts, b_parts = [], []
    device = next((f[0].device for c in circuits for f in c.factors.values()), None)
    for c, rank in zip(circuits, ranks if ranks is not None else [c.rank for c in circuits]):
        if module in c.factors:
            a, b = c.factors[module]
            if a.shape[0] < rank:  # modules of one circuit may differ in rank (imported rank patterns)
                a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
            a_parts.append(a)
            b_parts.append(b * c.scale)
        elif rank:
            a_parts.append(torch.zeros(rank, in_features, device=device))
            b_parts.append(torch.zeros(out_features, rank, device=device))
    if not a_parts:
        return torch.zeros(0, in_features, dtype=dtype, device=device), torch.zeros(
            out_features, 0, dtype=dtype, device=device
        )
    if len(a_parts) == 1:  # (one circuit: its A as it is, no copy)
        a_cat, b_cat = a_parts[0], b_parts[0]
    else:
        a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
    if dtype is not None:
        a_cat, b_cat = a_cat.to(dtype), b_cat.to(dtype)
    return a_cat, b_cat
