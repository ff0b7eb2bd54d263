"""Routing: which of an agent's gated circuits an input reaches.

A context circuit is an episodic memory of the interactions it learned from: it should act on inputs like
those and leave every other input alone. Each gated circuit keeps *prototypes*, the route features of the
prompts it learned from; an input reaches it when the input's feature lies within ``route_radius`` of one of
them. Everything else the agent reads (new topics, the held-out code of the continual benchmark) runs through
the slower tiers only, so learning a fact cannot disturb the model's general ability or another fact.

The route feature of a prompt is the mean, over its tokens, of the base model's input to one adapted module
(``LearningConfig.route_module``; the first, by default: the normalized token embeddings, computed without
running a single transformer block). Distances are measured in units of the spread of all the prompts learned so
far: ``d(x, c) = min_p ‖f(x) − p‖ / σ`` with ``σ² = E‖f − E f‖²`` over learned prompts. A radius of 0.5 thus
means "half as far as two learned prompts typically are from each other": prompts that share a template but
differ in their content are kept apart, and the memory does not need an absolute scale for each model.

The base model's features never change (nothing learned reaches them), so a circuit's prototypes stay valid
wherever the circuit goes. Circuits made from gated ones (a consensus, a residual) take their joint gate; circuits
without prototypes (imported, added by hand, or learned with routing off) are ungated and reach every input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .circuits import Circuit
from .errors import ConfigError

if TYPE_CHECKING:
    from .core import DynamicLoRA

MAX_PROTOTYPES = 16  # per circuit; a circuit attributed more distinct prompts keeps the most recent ones


def joint_gate(circuits: list[Circuit]) -> torch.Tensor | None:
    """The gate of a circuit made from these (a consensus, a residual): the distinct prototypes of them all, so it
    acts wherever any of them did; None (ungated) if any of them is ungated."""
    if not circuits or any(c.prototypes is None for c in circuits):
        return None
    return torch.unique(torch.cat([c.prototypes for c in circuits]), dim=0)


def covers(outer: Circuit, inner: Circuit) -> bool:
    """Does ``outer`` act on every prompt ``inner`` acts on? (Ungated acts everywhere; a gated circuit on its own
    prototypes, which a shared circuit holds for every contribution it was made of.)"""
    if outer.prototypes is None:
        return True
    if inner.prototypes is None:
        return False
    gaps = torch.cdist(inner.prototypes.float(), outer.prototypes.float()).min(dim=1).values
    return bool((gaps <= 1e-6 * inner.prototypes.norm(dim=1).clamp_min(1e-12)).all())


class _Captured(Exception):
    """Raised by the capture hook once the route module's input is in hand: nothing after it needs to run."""


class Router:
    def __init__(self, dl: DynamicLoRA) -> None:
        self.dl = dl
        names = list(dl.layers)
        wanted = dl.config.learning.route_module
        if wanted is not None and wanted not in dl.layers:
            raise ConfigError(
                f"LearningConfig.route_module {wanted!r} is not an adapted module; choose one of {names[:4]} …"
            )
        self.module = wanted or names[0]
        self.count = 0
        self.total: torch.Tensor | None = None  # Σ f over learned prompts
        self.square = 0.0  # Σ ‖f‖²

    @property
    def enabled(self) -> bool:
        return self.dl.config.learning.routing

    # -- features ---------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, prompts: list[list[int]]) -> torch.Tensor:
        """(B, d) route features: each prompt's mean base-model input to the route module (float32, CPU).

        Runs the base model only up to the route module; where the base inputs are at hand already (learning
        captures them), :meth:`feature_of` reads the feature from them instead."""
        dl = self.dl
        layer = dl.layers[self.module]
        out = []
        seen: list[torch.Tensor] = []

        def hook(module: torch.nn.Module, args: tuple) -> None:
            seen.append(args[0].detach())
            raise _Captured

        handle = layer.register_forward_pre_hook(hook)
        try:
            for ids in prompts:
                seen.clear()
                try:
                    dl.model(input_ids=torch.tensor([ids], device=dl.device), use_cache=False)
                except _Captured:
                    pass
                out.append(self.feature_of({self.module: seen[0]}, len(ids)))
        finally:
            handle.remove()
        return torch.stack(out)

    def feature_of(self, base_inputs: dict[str, torch.Tensor], prompt_tokens: int) -> torch.Tensor:
        """(d,) the route feature of a prompt from base-model module inputs ``(1, T, in)`` of a sequence that
        starts with it: the route module's input averaged over the prompt's tokens (causal: later tokens do not
        change it)."""
        return base_inputs[self.module][0, :prompt_tokens].float().mean(0).cpu()

    def observe(self, feature: torch.Tensor) -> None:
        """Count a learned prompt's feature in the spread that sets the distance unit."""
        self.count += 1
        self.total = feature.clone() if self.total is None else self.total + feature
        self.square += float(feature.pow(2).sum())

    @property
    def sigma(self) -> float:
        """Root-mean-square distance of learned prompts' features from their mean (floored above zero)."""
        if self.total is None:
            return 1.0
        mean = self.total / self.count
        spread = max(self.square / self.count - float(mean.pow(2).sum()), 0.0) ** 0.5
        return max(spread, 1e-3 * float(mean.norm()), 1e-12)

    # -- matching ---------------------------------------------------------------------------------
    def distances(self, feature: torch.Tensor, circuits: list[Circuit]) -> list[float]:
        """Distance, in units of sigma, from ``feature`` to each circuit's nearest prototype (0 if ungated)."""
        sigma = self.sigma
        out = []
        for c in circuits:
            if c.prototypes is None:
                out.append(0.0)
            else:
                out.append(float((c.prototypes - feature).norm(dim=-1).min()) / sigma)
        return out

    def affinity(self, distance: float) -> float:
        """A distance on the attribution scale of key activations: 1 at a prototype, falling linearly to the
        attribution threshold at the route radius, and below it beyond (as radius / distance)."""
        cfg = self.dl.config.learning
        theta, radius = cfg.attribution_threshold, cfg.route_radius
        if distance <= radius:
            return 1.0 - (1.0 - theta) * distance / radius
        return theta * radius / distance

    @staticmethod
    def remember(circuit: Circuit, feature: torch.Tensor) -> None:
        """Add a prompt's feature to the circuit's prototypes (the oldest goes when there are too many)."""
        row = feature.reshape(1, -1)
        circuit.prototypes = (
            row if circuit.prototypes is None else torch.cat([circuit.prototypes, row])[-MAX_PROTOTYPES:]
        )

    def skip(
        self,
        agent_ids: list[str] | tuple[str, ...],
        prompts: list[list[int]] | Callable[[], list[list[int]]],
        features: torch.Tensor | None = None,
    ) -> tuple[frozenset[str], ...]:
        """Per row, the ids of the gated circuits of its agent's stack that its prompt does not reach.

        Costs nothing when no row's stack holds a gated circuit; otherwise one partial base forward per prompt
        (none when the prompts' ``features`` are given).
        """
        hierarchy = self.dl.hierarchy
        gated = [
            [c for scope in hierarchy.stack_scopes(a) for c in scope.circuits.values() if c.prototypes is not None]
            for a in agent_ids
        ]
        if not any(gated):
            return tuple(frozenset() for _ in agent_ids)
        feats = features if features is not None else self.features(prompts() if callable(prompts) else prompts)
        radius = self.dl.config.learning.route_radius
        return tuple(
            frozenset(c.id for c, d in zip(row, self.distances(f, row)) if d > radius) for row, f in zip(gated, feats)
        )

    # -- persistence ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "count": self.count,
            "square": self.square,
            "total": None if self.total is None else self.total.tolist(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("module", self.module) != self.module:
            raise ValueError(
                f"the saved memory routes on {state['module']!r} but LearningConfig.route_module gives "
                f"{self.module!r}; load it with route_module={state['module']!r}"
            )
        self.count, self.square = int(state["count"]), float(state["square"])
        self.total = None if state.get("total") is None else torch.tensor(state["total"], dtype=torch.float32)
