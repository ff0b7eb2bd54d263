"""The adapted layer: ``y = W x + Σ_tiers Σ_circuits s · B (A x)``, computed the fast way.

A :class:`StackedLinear` wraps a model's Linear (or GPT-2 ``Conv1D``) as ``base_layer`` and, while a
:class:`Session` is active, applies that session's :class:`ModulePlan`:

* ``weight``: a cached effective weight ``W + ΔW`` holding the slow tiers shared by every row
  (``None`` → the base layer itself);
* ``a``/``b``: the per-agent circuits concatenated along the rank axis, so each module does two small
  matmuls whatever the number of circuits. For a batch whose rows belong to different agents the
  factors are gathered per row, ``(B, in, R)`` and ``(B, R, out)``, and applied with ``bmm``
  (the Punica / S-LoRA idea) instead of a loop over agents;
* ``obs``: a ``(R, C)`` (or per-row ``(B, R, C)``) map from rank columns to circuits used to read each
  circuit's activation ``‖A_c x‖² / ‖x‖²`` out of ``h = x Aᵀ``, which the forward computes anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2-style blocks keep weights as (in, out) in a Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment,misc]


@dataclass
class ModulePlan:
    """What one adapted module applies during a session. Tensors are in the layer's dtype and device."""

    weight: torch.Tensor | None = None  # (out, in) effective weight of merged tiers
    a: torch.Tensor | None = None  # (R, in), or (B, in, R) when hetero
    b: torch.Tensor | None = None  # (out, R), or (B, R, out) when hetero
    obs: torch.Tensor | None = None  # (R, C) or (B, R, C): column energy -> circuit, weighted 1/rms(A_c)^2
    hetero: bool = False
    merged_a: torch.Tensor | None = None  # (Rm, in): merged tiers' A, read only on sampled forwards
    merged_obs: torch.Tensor | None = None  # (Rm, Cm)


@dataclass
class Session:
    """Per-run mutable state: usage accumulators, the optional padding mask, optional input capture."""

    num_rows: int
    num_circuits: int
    num_merged: int
    observe: bool = True
    sample_merged: bool = False
    mask: torch.Tensor | None = None  # (B, T) 1 for real tokens
    capture: dict[str, torch.Tensor] | None = None
    usage: torch.Tensor = field(init=False)  # (B, C) summed energy ratios
    merged_usage: torch.Tensor = field(init=False)  # (B, Cm)
    observations: int = 0
    merged_observations: int = 0

    def __post_init__(self) -> None:
        self.usage = torch.zeros(self.num_rows, self.num_circuits)
        self.merged_usage = torch.zeros(self.num_rows, self.num_merged)

    def _energy(self, x: torch.Tensor, h: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        x, h = x.detach().float(), h.detach().float()
        if self.mask is not None and self.mask.shape == x.shape[:2]:
            m = self.mask.to(x.dtype).unsqueeze(-1)
            x, h = x * m, h * m
        col = h.pow(2).sum(1)  # (B, R)
        total = x.pow(2).sum((1, 2)).clamp_min(1e-12)  # (B,)
        per_circuit = col @ obs if obs.dim() == 2 else torch.bmm(col.unsqueeze(1), obs.float()).squeeze(1)
        return (per_circuit / total.unsqueeze(1)).cpu()

    def record(self, x: torch.Tensor, h: torch.Tensor, obs: torch.Tensor) -> None:
        self.usage += self._energy(x, h, obs.float())
        self.observations += 1

    def record_merged(self, x: torch.Tensor, a: torch.Tensor, obs: torch.Tensor) -> None:
        self.merged_usage += self._energy(x, F.linear(x.detach(), a), obs.float())
        self.merged_observations += 1

    def activations(self) -> torch.Tensor:
        """(B, C) normalized activation per row and circuit: sqrt of the mean energy fraction, in [0, 1]."""
        return (self.usage / max(self.observations, 1)).clamp_min(0).sqrt()

    def merged_activations(self) -> torch.Tensor:
        return (self.merged_usage / max(self.merged_observations, 1)).clamp_min(0).sqrt()


class StackedLinear(nn.Module):
    """Wraps a Linear or Conv1D; without an active session it is exactly the base layer."""

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.is_conv1d = bool(Conv1D) and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.is_conv1d else (w.shape[1], w.shape[0])
        self.plan: ModulePlan | None = None
        self.session: Session | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the wrapped layer's layout."""
        w = self.base_layer.weight
        return w.T if self.is_conv1d else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan, session = self.plan, self.session
        if plan is None:
            return self.base_layer(x)
        if session is not None and session.capture is not None:
            session.capture[self.name] = x.detach()
        y = self.base_layer(x) if plan.weight is None else F.linear(x, plan.weight, self.bias)
        if plan.a is not None:
            if plan.hetero:
                h = torch.bmm(x, plan.a)  # (B, T, in) @ (B, in, R) -> (B, T, R)
                y = y + torch.bmm(h, plan.b)  # (B, T, R) @ (B, R, out)
            else:
                h = F.linear(x, plan.a)  # (B, T, R)
                y = y + F.linear(h, plan.b)
            if session is not None and session.observe and plan.obs is not None:
                session.record(x, h, plan.obs)
        if session is not None and session.sample_merged and plan.merged_a is not None:
            session.record_merged(x, plan.merged_a, plan.merged_obs)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}, conv1d={self.is_conv1d}"


def find_target_modules(model: nn.Module, patterns: tuple[str, ...] | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the Linear/Conv1D modules to adapt.

    ``patterns=None`` takes every Linear/Conv1D except the output head (PEFT's ``all-linear``). Patterns are
    regular expressions matched with ``re.search`` against the full module name.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_types = (nn.Linear, StackedLinear) + ((Conv1D,) if Conv1D else ())
    names: list[str] = []
    wrapped: list[str] = []  # a model wrapped before: its StackedLinears are the targets, not their insides
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, StackedLinear):
            wrapped.append(name)
        if not isinstance(module, linear_types) or module is head:
            continue
        if patterns is not None and not any(re.search(p, name) for p in patterns):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        names.append(name)
    return names


def inject(model: nn.Module, names: list[str]) -> dict[str, StackedLinear]:
    """Replace each named module by a StackedLinear wrapping it; returns them by name (in model order)."""
    wrapped: dict[str, StackedLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if isinstance(layer, StackedLinear):
            wrapped[name] = layer
            continue
        stacked = StackedLinear(layer, name)
        setattr(parent, child, stacked)
        wrapped[name] = stacked
    return wrapped
