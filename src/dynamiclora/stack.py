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

    weight: torch.Tensor | None = None  # (out, in) effective weight of merged tiers (one merge group)
    # several merge groups (rows of different swarms or domains): per group, its rows and effective weight
    weight_rows: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
    a: torch.Tensor | None = None  # (B, in, R) one per row when hetero, else (1, in, R) expanded over the batch
    b: torch.Tensor | None = None  # (B, R, out) or (1, R, out)
    obs: torch.Tensor | None = None  # (R, C) or (B, R, C): column energy -> circuit, weighted 1/rms(A_c)^2
    hetero: bool = False
    upcast: bool = False  # a half-precision model: the low-rank path runs in float32 and is rounded once
    merged_a: torch.Tensor | None = None  # (Rm, in): merged tiers' A, read only on sampled forwards
    merged_obs: torch.Tensor | None = None  # (Rm, Cm)
    # Modules fed the same input tensor (q/k/v, gate/up) share one A-projection: the group's first module
    # holds the concatenated A (and its observation map) and computes h for all; members slice [lo, hi).
    group_a: torch.Tensor | None = None  # (R_g, in), or (B, in, R_g)
    group_obs: torch.Tensor | None = None
    grouped: bool = False
    group_size: int = 1
    lo: int = 0
    hi: int = 0


@dataclass
class Session:
    """Per-run mutable state: usage probes, the optional padding mask, optional input capture.

    The forward only stores, per module call, the energies ``Σ_t h²`` per rank column (B, R) and ``‖x‖`` per row
    (B,), on the model's device; everything else is one einsum in :meth:`activations`. Modules that share
    an input tensor (q/k/v, gate/up) share its norm.
    """

    num_rows: int
    num_circuits: int
    num_merged: int
    observe: bool = True
    sample_merged: bool = False
    mask: torch.Tensor | None = None  # (B, T) 1 for real tokens
    capture: dict[str, torch.Tensor] | None = None
    _cols: list[torch.Tensor] = field(default_factory=list)  # (B, R) column energies
    _rows: list[torch.Tensor] = field(default_factory=list)  # (B,) input norms
    _maps: list[torch.Tensor] = field(default_factory=list)  # (R, C) or (B, R, C)
    _modules: int = 0  # module observations recorded (a shared projection records several at once)
    _merged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _last_x: torch.Tensor | None = None
    _last_norm: torch.Tensor | None = None

    def _norms(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column energies ``Σ_t h²`` (B, R) and input norms ``‖x‖`` (B,).

        (``square().sum(1)`` rather than ``vector_norm(dim=1)``: reducing the token axis with vector_norm takes
        a slow path on CPU, 4-30x slower; the flattened (1, 2) reduction for x is fast.)
        """
        h = h.detach()
        if self.mask is not None and self.mask.shape == x.shape[:2]:
            m = self.mask.to(x.dtype).unsqueeze(-1)
            return (h * m).square().sum(1), torch.linalg.vector_norm(x.detach() * m, dim=(1, 2))
        if x is not self._last_x:
            self._last_x, self._last_norm = x, torch.linalg.vector_norm(x.detach(), dim=(1, 2))
        return h.square().sum(1), self._last_norm

    def record(self, x: torch.Tensor, h: torch.Tensor, obs: torch.Tensor, modules: int = 1) -> None:
        col, row = self._norms(x, h)
        self._cols.append(col)
        self._rows.append(row)
        self._maps.append(obs)
        self._modules += modules

    def record_merged(self, x: torch.Tensor, a: torch.Tensor, obs: torch.Tensor) -> None:
        col, row = self._norms(x, F.linear(x.detach(), a))
        self._merged.append((col, row, obs))

    @property
    def observations(self) -> int:
        return self._modules

    @property
    def merged_observations(self) -> int:
        return len(self._merged)

    @staticmethod
    def _mean_activation(
        cols: list[torch.Tensor],
        rows: list[torch.Tensor],
        maps: list[torch.Tensor],
        shape: tuple[int, int],
        modules: int,
    ) -> torch.Tensor:
        if not cols:
            return torch.zeros(shape)
        buckets: dict[tuple, list[int]] = {}  # records of equal width (one per group size) reduce together
        for i, (col, m) in enumerate(zip(cols, maps)):
            buckets.setdefault((tuple(col.shape), tuple(m.shape)), []).append(i)
        total = 0
        for idx in buckets.values():
            col = torch.stack([cols[i] for i in idx]).float()  # (E, B, R)
            row = torch.stack([rows[i] for i in idx]).float()  # (E, B)
            ratio = col / row.square().clamp_min(1e-12).unsqueeze(-1)  # col holds energies already
            maps_t = torch.stack([maps[i] for i in idx]).float()  # (E, R, C) or (E, B, R, C)
            total = total + torch.einsum("ebr,erc->bc" if maps_t.dim() == 3 else "ebr,ebrc->bc", ratio, maps_t)
        return (total / max(modules, 1)).clamp_min(0).sqrt().cpu()

    def activations(self) -> torch.Tensor:
        """(B, C) normalized activation per row and circuit: sqrt of the mean energy fraction, in [0, 1]."""
        return self._mean_activation(
            self._cols, self._rows, self._maps, (self.num_rows, self.num_circuits), self._modules
        )

    def merged_activations(self) -> torch.Tensor:
        cols, rows, maps = (list(t) for t in zip(*self._merged)) if self._merged else ([], [], [])
        return self._mean_activation(cols, rows, maps, (self.num_rows, self.num_merged), len(self._merged))


class Binding:
    """What every adapted layer of one model currently applies: one object shared by all of them, so that
    activating a plan costs two attribute writes instead of two per layer."""

    __slots__ = ("plans", "session", "group_x", "group_h")

    def __init__(self) -> None:
        self.plans: list[ModulePlan] | None = None  # indexed by StackedLinear.index
        self.session: Session | None = None
        self.group_x: torch.Tensor | None = None  # input of the last group projection ...
        self.group_h: torch.Tensor | None = None  # ... and its result, for the group's other members

    def clear(self) -> None:
        self.plans = self.session = self.group_x = self.group_h = None


def _rows(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row factors (B, …) for a batch x (B, T, ·): one set shared by every row is expanded, not copied."""
    return factor if factor.shape[0] == x.shape[0] else factor.expand(x.shape[0], -1, -1)


class StackedLinear(nn.Module):
    """Wraps a Linear or Conv1D; without an active plan it is exactly the base layer."""

    def __init__(self, base_layer: nn.Module, name: str, index: int, binding: Binding) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.index = index
        self.binding = binding
        self.is_conv1d = bool(Conv1D) and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.is_conv1d else (w.shape[1], w.shape[0])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the wrapped layer's layout."""
        w = self.base_layer.weight
        return w.T if self.is_conv1d else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plans, session = self.binding.plans, self.binding.session
        if plans is None:
            return self.base_layer(x)
        plan = plans[self.index]
        if session is not None and session.capture is not None:
            session.capture[self.name] = x.detach()
        if plan.weight_rows is not None:  # rows of several merge groups: each through its own weight
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for rows, weight in plan.weight_rows:
                y[rows] = self._base(x[rows]) if weight is None else F.linear(x[rows], weight, self.base_layer.bias)
        elif plan.weight is not None:
            y = F.linear(x, plan.weight, self.base_layer.bias)
        else:
            y = self._base(x)
        if plan.a is not None:
            observe = session is not None and session.observe
            binding = self.binding
            xa = x.float() if plan.upcast else x
            if plan.group_a is not None:  # first module of an input group: project for the whole group
                h_all = torch.bmm(xa, _rows(plan.group_a, x))
                binding.group_x, binding.group_h = x, h_all
                if observe:
                    session.record(x, h_all, plan.group_obs, plan.group_size)
                h = h_all[..., plan.lo : plan.hi]
            elif plan.grouped and binding.group_x is x:
                h = binding.group_h[..., plan.lo : plan.hi]
            else:  # alone, or (in an unusual model) not fed its group's input after all
                h = torch.bmm(xa, _rows(plan.a, x))  # (B, T, R)
                if observe:
                    session.record(x, h, plan.obs)
            b = _rows(plan.b, x)  # (B, R, out): the same kernel for a row alone and batched
            if plan.upcast:
                y = torch.baddbmm(y.float(), h, b).to(y.dtype)
            elif torch.is_grad_enabled():
                y = torch.baddbmm(y, h, b)
            else:
                y = y.baddbmm_(h, b)
        if session is not None and session.sample_merged and plan.merged_a is not None:
            session.record_merged(x, plan.merged_a, plan.merged_obs)
        return y

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) if self.is_conv1d else F.linear(x, self.base_layer.weight, self.base_layer.bias)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}, conv1d={self.is_conv1d}"


def find_target_modules(
    model: nn.Module, patterns: tuple[str, ...] | None, exclude: tuple[str, ...] = ()
) -> list[str]:
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


def probe_input_groups(model: nn.Module, layers: dict[str, StackedLinear]) -> list[list[str]]:
    """Groups of adapted layers that receive the very same input tensor, found by one tiny forward.

    In Llama-style blocks q/k/v share the normed hidden state and gate/up share theirs; such layers can
    share one A-projection. Any layer whose input is its own forms a group of one.
    """
    seen: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # hold the inputs so that ids are not reused during the probe

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            keep.append(args[0])
            seen.setdefault(name, id(args[0]))

        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except Exception:  # a model that cannot run this probe simply gets no shared projections
        return [[name] for name in layers]
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name in layers:
        groups.setdefault(seen.get(name, -hash(name)), []).append(name)
    return list(groups.values())


def inject(model: nn.Module, names: list[str]) -> tuple[dict[str, StackedLinear], Binding]:
    """Replace each named module by a StackedLinear wrapping it; returns them by name and their binding.

    A model wrapped before keeps its layers and binding; layers are (re)indexed in ``names`` order.
    """
    existing = [m for m in model.modules() if isinstance(m, StackedLinear)]
    binding = existing[0].binding if existing else Binding()
    wrapped: dict[str, StackedLinear] = {}
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if not isinstance(layer, StackedLinear):
            layer = StackedLinear(layer, name, index, binding)
            setattr(parent, child, layer)
        layer.index, layer.binding = index, binding
        wrapped[name] = layer
    return wrapped, binding
