"""Routing inside a request's own forward, where nothing learned changes what the route module sees.

A route feature is the base model's input to the route module (see routing.py), and the router computes it with
a pre-pass: the base model's layers up to that module, run before the adapted forward (layers 0-3 of SmolLM2 for
token gates: a new request then costs about 1.15x the base model's forward). When no circuit of any row's stack
covers an adapted module before the route module, the adapted forward computes those very inputs on its way, and
the pre-pass only repeats them. Then the forward starts with every gated circuit left out (none of them acts
before the route module, so nothing differs there) and, at the route module, a hook reads each row's prompt
states, routes them, and switches the batch to the plan with the gated circuits each row reaches, for the route
module and every module after it.

Only the rounding of a batch (other rows, padding, another kernel) can make those states differ from the
pre-pass's, by far less than ``SLACK``. A decision that a change of every match by ``SLACK`` could flip is not
taken here: the hook stops the forward (:class:`RouteInDoubt`) and the caller routes with the pre-pass, as it
would have without this. So every route, and every output, is the pre-pass's; a new request just does not pay
for the layers before the route module twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .circuits import Circuit
from .hierarchy import Hierarchy, ScopeKey
from .planner import BatchPlan, Planner
from .routing import Router
from .stack import Binding

# float32 inputs: route matches (cosines, radii) this near a threshold are decided by the pre-pass. The rounding of
# a batch moved SmolLM2's token-gate matches by at most 4.2e-7 (60 padded batches of 2-8 rows, left and right).
SLACK = 1e-4
HALF_SLACK = 3e-2  # float16 / bfloat16 inputs


class RouteInDoubt(Exception):
    """Some row's route could change under the rounding of its batch: route it with the pre-pass instead."""


@dataclass
class InlineRouting:
    """Decides whether a batch can be routed inside its forward, and makes the hook that does it."""

    router: Router
    planner: Planner
    hierarchy: Hierarchy
    binding: Binding
    early: frozenset[str]  # the adapted modules that run before the route module
    _clear: dict[ScopeKey, tuple[int, bool]] = field(default_factory=dict)  # per scope: (version, _after_route)

    def applies(self, agent_ids: Sequence[str], without: tuple[str, ...] = ()) -> bool:
        """Does the route module see the base model's inputs in this batch's forward? Yes when no circuit of any
        row's stack (less the tiers in ``without``) covers a module before it."""
        for agent_id in set(agent_ids):
            for key in self.hierarchy.agent(agent_id).stack():
                if key.tier in without:
                    continue
                if not self._after_route(key):
                    return False
        return True

    def _after_route(self, key: ScopeKey) -> bool:
        """Does every circuit of this scope stay off the modules before the route module? (Kept per scope version:
        any change to a scope's circuits bumps it.)"""
        scope = self.hierarchy.scopes[key]
        known = self._clear.get(key)
        if known is None or known[0] != scope.version:
            clear = all(c.factors.keys().isdisjoint(self.early) for c in scope.circuits.values())
            known = self._clear[key] = (scope.version, clear)
        return known[1]

    def route(
        self,
        agent_ids: Sequence[str],
        without: tuple[str, ...],
        gated: list[list[Circuit]],
        rows: list[tuple[list[int], torch.Tensor]],
    ) -> InlineRoute:
        """The inline route of one forward: ``gated`` per row its gated circuits, ``rows`` per row its routed
        prompt and the positions of those tokens in the batch (the first forward's sequence axis)."""
        return InlineRoute(self, tuple(agent_ids), without, gated, rows)


class InlineRoute:
    """One forward routed at its route module. ``plan`` is the plan in force: before the route module every gated
    circuit left out; from it on, the routed plan (what :meth:`Planner.plan` gives for the pre-pass's routes)."""

    def __init__(
        self,
        routing: InlineRouting,
        agent_ids: tuple[str, ...],
        without: tuple[str, ...],
        gated: list[list[Circuit]],
        rows: list[tuple[list[int], torch.Tensor]],
    ) -> None:
        self.routing, self.agent_ids, self.without, self.gated, self.rows = routing, agent_ids, without, gated, rows
        self.plan: BatchPlan = routing.planner.plan(
            agent_ids, without=without, skip=tuple(frozenset(c.id for c in g) for g in gated)
        )
        self.routed = False
        self.skip: tuple[frozenset[str], ...] | None = None  # per row, once routed: the gated circuits it leaves out

    @contextlib.contextmanager
    def hooked(self) -> Iterator[InlineRoute]:
        """Route at the first call of the route module inside the block (a prefill; decoding steps find it done)."""
        handle = self.routing.router.layer.register_forward_pre_hook(self._route)
        try:
            yield self
        finally:
            handle.remove()
        if not self.routed:  # (a model that never called its route module: what ran is not routed)
            raise RouteInDoubt

    def _route(self, module: torch.nn.Module, args: tuple) -> None:
        if self.routed:
            return
        x = args[0].detach()
        router, slack = self.routing.router, SLACK if x.dtype in (torch.float32, torch.float64) else HALF_SLACK
        features = [
            router.feature_of({router.module: x[i : i + 1, positions.to(x.device)]}, prompt) if gated else None
            for i, ((prompt, positions), gated) in enumerate(zip(self.rows, self.gated))
        ]
        skip = router.certain_skip(self.gated, features, slack)
        if skip is None:
            raise RouteInDoubt
        self.skip = skip
        self.plan = self.routing.planner.plan(self.agent_ids, without=self.without, skip=skip)
        binding = self.routing.binding
        binding.plans = self.plan.module_list
        if binding.session is not None:  # (no unmerged circuit acted before here: nothing is recorded yet)
            binding.session.num_circuits = len(self.plan.circuits)
        self.routed = True
