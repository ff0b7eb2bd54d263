"""Swarms across processes and hosts: shared scopes kept identical with torch.distributed collectives.

Every process holds its own DynamicLoRA (same base model) with its own agents; agents of one swarm may live in
different processes. :func:`join_swarm` hooks two exchanges into the tick, both all-gathers over a gloo group:

1. before the phases are computed, the uses of every shared-scope circuit (keyed by content hash, so that ids
   do not matter) are summed over the ranks: every rank then sees the same usage, so phases, decay and
   forgetting of shared circuits come out the same everywhere;
2. the sharing step's proposals (circuits bound for shared scopes, with their records) are gathered, de-duplicated
   and sorted, so every rank applies the same deterministic resonance rule to the same list; consensus circuits
   get ids derived from their content, and owner scopes take their residuals only where they live.

Ranks must tick together (a tick is a collective). :meth:`SwarmGroup.verify` gathers the content hash of every
shared scope and names any that differ. A rank that dies or hangs makes the others fail with
:class:`~dynamiclora.errors.SwarmSyncError` after the group's timeout; what they saved before stays loadable.

Limitation: a tier's homeostatic thresholds are computed per rank over the shared scopes that rank holds. Ranks
that hold the same shared scopes (one swarm spread over processes, the usual case) stay identical; ``verify``
reports it otherwise.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..circuits import Circuit
from ..errors import SwarmSyncError
from ..gates import Gate
from ..hierarchy import SHARED_TIERS
from .resonance import Proposal

if TYPE_CHECKING:
    from .memory import Memory


class SwarmGroup:
    """This process's membership in a distributed swarm (see the module docstring)."""

    def __init__(self, memory: Memory, device: torch.device, group: Any = None, timeout_s: float = 60.0) -> None:
        self.memory, self.device = memory, device
        self.group = group
        self.timeout_s = timeout_s
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        memory.sync_usage = self.sync_usage
        memory.sharing.exchange = self.exchange

    def _gather(self, what: str, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, (self.memory.clock.tick, obj), group=self.group)
        except Exception as exc:  # gloo raises RuntimeError (timeout, closed connection) and friends
            raise SwarmSyncError(
                f"rank {self.rank}/{self.world_size}: exchanging {what} at tick {self.memory.clock.tick} failed "
                f"(timeout {self.timeout_s:.0f} s): {exc}. Another rank died, hung or stopped ticking. This "
                "process's in-memory state is mid-tick and should be dropped; its last saved state is intact: "
                "restart every rank from its saved state (DynamicLoRA.load)."
            ) from exc
        ticks = {t for t, _ in out}
        if len(ticks) != 1:
            raise SwarmSyncError(
                f"rank {self.rank}: ranks are at different ticks {sorted(ticks)} while exchanging {what}; every "
                "rank must call dl.tick() the same number of times (ticks are collective)"
            )
        return [payload for _, payload in out]

    # -- the two exchanges ------------------------------------------------------------------------------
    def sync_usage(self) -> None:
        """Sum the uses of shared-scope circuits over all ranks (keyed by scope and content hash)."""
        local: dict[tuple[str, str], tuple[int, Circuit]] = {}
        for key, scope in self.memory.hierarchy.scopes.items():
            if key.tier in SHARED_TIERS:
                for c in scope.circuits.values():
                    local[(str(key), c.content_hash())] = (c.uses_this_tick, c)
        gathered = self._gather("shared-circuit uses", {k: uses for k, (uses, _) in local.items()})
        for k, (_, c) in local.items():
            c.uses_this_tick = sum(g.get(k, 0) for g in gathered)

    def exchange(self, proposals: list[Proposal]) -> list[Proposal]:
        """Every rank's proposals, de-duplicated (a shared scope's circuit is proposed by every rank holding it)."""
        payload = [_pack(p) for p in proposals]
        mine = {(packed["owner"], packed["target"], packed["hash"]): p for packed, p in zip(payload, proposals)}
        gathered = self._gather("proposals for shared scopes", payload)
        out: dict[tuple[str, str, str], Proposal] = {}
        for rank_payload in gathered:
            for packed in rank_payload:
                key = (packed["owner"], packed["target"], packed["hash"])
                if key not in out:
                    out[key] = mine.get(key) or _unpack(packed, self.device)
        return [out[k] for k in sorted(out)]

    def verify(self) -> dict[str, list[str]]:
        """Content hashes of the shared scopes on every rank; returns {scope: [hash per rank]} for those that differ
        among the ranks holding them (empty when the swarm is consistent)."""
        local = {
            str(k): s.content_hash()
            for k, s in self.memory.hierarchy.scopes.items()
            if k.tier in SHARED_TIERS and len(s)
        }
        gathered = self._gather("shared-scope hashes", local)
        differing = {}
        for scope in sorted({s for g in gathered for s in g}):
            hashes = [g.get(scope, "") for g in gathered]
            if len({h for h in hashes if h}) > 1:
                differing[scope] = hashes
        return differing

    def leave(self) -> None:
        """Leave the swarm cleanly: wait for every rank, then tear the process group down."""
        self.memory.sync_usage = None
        self.memory.sharing.exchange = None
        dist.barrier(group=self.group)
        dist.destroy_process_group(self.group)


def _pack(p: Proposal) -> dict[str, Any]:
    c = p.circuit
    return {
        "owner": p.owner,
        "target": p.target,
        "hash": c.content_hash(),
        "contributors": sorted(p.contributors),
        "stability": p.stability,
        "critical": p.critical,
        "record": c.record(),
        "factors": {m: (a.detach().cpu(), b.detach().cpu()) for m, (a, b) in c.factors.items()},
        "gate": None if c.gate is None else c.gate.to_tensors(),
    }


def _unpack(packed: dict[str, Any], device: torch.device) -> Proposal:
    factors = {m: (a.to(device), b.to(device)) for m, (a, b) in packed["factors"].items()}
    circuit = Circuit.from_record(packed["record"], factors)
    gate = packed.get("gate")
    circuit.gate = None if gate is None else Gate.restore(gate, packed["record"])
    return Proposal(
        circuit,
        frozenset(packed["contributors"]),
        packed["owner"],
        packed["stability"],
        packed["critical"],
        packed["target"],
    )


def open_group(timeout_s: float = 60.0, backend: str = "gloo") -> None:
    """Join the process group described by the environment (``torchrun`` sets RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), unless one is open already."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise SwarmSyncError(
                f"join_swarm needs a process group: launch with torchrun (it sets {', '.join(missing)}), or call "
                "torch.distributed.init_process_group yourself first"
            )
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
