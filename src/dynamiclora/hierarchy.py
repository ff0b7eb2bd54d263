"""Scopes, agents, stacks and snapshots.

Tiers are keyed: ``foundation`` is one scope; ``domain[name]``, ``swarm[name]``, ``agent[id]`` and
``context[id]`` are many. An agent registered as (id, swarm, domain) owns the stack
foundation → domain → swarm → agent → context; agents share the slower scopes.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from .circuits import Circuit
from .config import TIERS
from .errors import RegistrationError, UnknownAgentError, UnknownScopeError

SHARED_TIERS = ("foundation", "domain", "swarm")
DEFAULT_SWARM, DEFAULT_DOMAIN = "default", "general"  # where an agent registered without them belongs
_versions = itertools.count(1)  # one counter for all scopes: a version never repeats, even across objects


class ScopeKey(NamedTuple):
    tier: str
    name: str

    def __str__(self) -> str:
        return self.tier if self.tier == "foundation" else f"{self.tier}:{self.name}"

    @classmethod
    def parse(cls, text: str | ScopeKey | tuple[str, str]) -> ScopeKey:
        """``"foundation"``, ``"domain:python"``, ``"agent:alice"`` … → ScopeKey, with a clear error otherwise."""
        if isinstance(text, tuple):
            tier, name = text
        else:
            tier, _, name = str(text).partition(":")
        if tier not in TIERS:
            raise UnknownScopeError(
                f"unknown tier {tier!r} in scope {text!r}; "
                f"write 'foundation' or '<tier>:<name>' with tier one of {TIERS}"
            )
        if tier == "foundation":
            name = ""
        elif not name:
            raise UnknownScopeError(f"scope {text!r} needs a name: write '{tier}:<name>'")
        return cls(tier, name)


FOUNDATION = ScopeKey("foundation", "")


class Scope:
    """The circuits of one keyed tier. Mutations bump ``version``; the content hash is cached per version."""

    def __init__(self, key: ScopeKey) -> None:
        self.key = key
        self.circuits: dict[str, Circuit] = {}
        self.version = next(_versions)
        self.records = next(_versions)  # bumped when a circuit's record (not its content) changes
        self._hash: tuple[int, str] | None = None

    def add(self, circuit: Circuit) -> None:
        circuit.tier, circuit.scope = self.key.tier, self.key.name
        self.circuits[circuit.id] = circuit
        self.touch()

    def remove(self, circuit_id: str) -> Circuit:
        circuit = self.circuits.pop(circuit_id)
        self.touch()
        return circuit

    def touch(self) -> None:
        """Declare that some circuit's tensors or scale changed."""
        self.version = next(_versions)

    def note(self) -> None:
        """Declare that some circuit's record changed (its use, usage, phase …), not what it computes."""
        self.records = next(_versions)

    def content_hash(self) -> str:
        """sha256 over the sorted content hashes of the circuits: independent of insertion order and ids."""
        if self._hash is None or self._hash[0] != self.version:
            h = hashlib.sha256(b"scope")
            for digest in sorted(c.content_hash() for c in self.circuits.values()):
                h.update(bytes.fromhex(digest))
            self._hash = (self.version, h.hexdigest())
        return self._hash[1]

    def __len__(self) -> int:
        return len(self.circuits)

    def __repr__(self) -> str:
        return f"Scope({self.key}, circuits={len(self)}, version={self.version})"


@dataclass
class Clock:
    """The memory's counters: ticks run (advanced by the memory) and interactions served (by the facade)."""

    tick: int = 0
    interactions: int = 0


@dataclass(frozen=True)
class AgentInfo:
    id: str
    swarm: str
    domain: str

    def stack(self) -> tuple[ScopeKey, ...]:
        return (
            FOUNDATION,
            ScopeKey("domain", self.domain),
            ScopeKey("swarm", self.swarm),
            ScopeKey("agent", self.id),
            ScopeKey("context", self.id),
        )


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of one agent's stack, identified by its provenance hash."""

    agent_id: str
    base_fingerprint: str
    tokenizer_fingerprint: str
    scope_hashes: tuple[tuple[str, str], ...]  # (scope key, content hash), foundation first
    provenance_hash: str = field(init=False)

    def __post_init__(self) -> None:
        h = hashlib.sha256(b"dynamiclora-snapshot-v1")
        h.update(self.base_fingerprint.encode())
        h.update(self.tokenizer_fingerprint.encode())
        for position, (_, digest) in enumerate(self.scope_hashes):
            h.update(f"{TIERS[position]}={digest};".encode())
        object.__setattr__(self, "provenance_hash", h.hexdigest())


class Hierarchy:
    """Registry of scopes and agents."""

    def __init__(self) -> None:
        self.scopes: dict[ScopeKey, Scope] = {FOUNDATION: Scope(FOUNDATION)}
        self.agents: dict[str, AgentInfo] = {}

    def register(self, agent_id: str, swarm: str, domain: str) -> AgentInfo:
        for what, value in (("agent id", agent_id), ("swarm", swarm), ("domain", domain)):
            if not isinstance(value, str) or not value or ":" in value:
                field = {"agent id": "id"}.get(what, what)
                raise RegistrationError(f"{what} must be a non-empty string without ':', got {value!r}", field)
        info = AgentInfo(agent_id, swarm, domain)
        other = self.swarm_domain(swarm)
        if other is not None and other != domain:
            raise RegistrationError(
                f"swarm {swarm!r} belongs to domain {other!r} (its agents are registered there); a swarm lives in one "
                f"domain, so register {agent_id!r} with domain={other!r} or give it another swarm",
                "domain",
                conflict=True,
            )
        known = self.agents.get(agent_id)
        if known is not None and known != info:
            raise RegistrationError(
                f"agent {agent_id!r} is already registered with swarm={known.swarm!r}, domain={known.domain!r}; "
                f"use a new id, or call agent({agent_id!r}) without swarm/domain to get it",
                "id",
                conflict=True,
            )
        self.agents[agent_id] = info
        for key in info.stack():
            self.scopes.setdefault(key, Scope(key))
        return info

    def swarm_domain(self, swarm: str) -> str | None:
        """The domain a swarm belongs to (the hierarchy is a tree), or None if no agent of it is registered."""
        return next((a.domain for a in self.agents.values() if a.swarm == swarm), None)

    def agent(self, agent_id: str) -> AgentInfo:
        try:
            return self.agents[agent_id]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none yet"
            raise UnknownAgentError(
                f"unknown agent {agent_id!r} (registered: {known}); register it with dl.agent({agent_id!r}, "
                "swarm=..., domain=...)"
            ) from None

    def scope(self, key: str | ScopeKey, create: bool = False) -> Scope:
        key = ScopeKey.parse(key)
        if key not in self.scopes:
            if create and key.tier in SHARED_TIERS:
                self.scopes[key] = Scope(key)
            elif create and key.name in self.agents:
                self.scopes[key] = Scope(key)
            else:
                known = ", ".join(sorted(map(str, self.scopes)))
                raise UnknownScopeError(f"unknown scope {str(key)!r} (known: {known}); register an agent that uses it")
        return self.scopes[key]

    def stack_scopes(self, agent_id: str) -> list[Scope]:
        return [self.scopes[k] for k in self.agent(agent_id).stack()]

    def note(self, circuit: Circuit) -> None:
        """A circuit's record changed: its scope has to be saved again (see store.Writer)."""
        scope = self.scopes.get(ScopeKey(circuit.tier, circuit.scope))  # (set by Scope.add)
        if scope is not None:
            scope.note()

    def all_circuits(self) -> list[Circuit]:
        return [c for s in self.scopes.values() for c in s.circuits.values()]

    def find_circuit(self, circuit_id: str) -> tuple[Scope, Circuit]:
        for scope in self.scopes.values():
            if circuit_id in scope.circuits:
                return scope, scope.circuits[circuit_id]
        raise KeyError(f"unknown circuit {circuit_id!r}")
