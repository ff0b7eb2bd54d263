"""Forgetting on request: what one agent taught, taken back out of the memory where it can be separated.

A learned circuit acts where its gate's keys reach, and each key records the agents whose prompts put it there
(``Gate.owners``). So what an agent taught about one prompt, or everything it taught, is separable where it is a
key: a key only that agent put there is removed (the circuit no longer acts where that key reached), and a circuit
left with no key is removed. What is not separable is reported, never silently kept:

- a key other agents put there too (a pattern they taught as well): the agent is dropped from its owners, the key
  stays;
- an ungated circuit (learned with routing off, or a merge of one): it acts everywhere, no key to remove;
- the delta of a shared circuit that keeps other keys: one sum of its contributors' patterns.

The agent's own tiers (agent, context) hold only what it taught, so every key there that the prompt reaches goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .hierarchy import Hierarchy, Scope, ScopeKey

OWN_TIERS = ("agent", "context")


@dataclass
class ForgetReport:
    keys_removed: int = 0
    circuits_removed: list[str] = field(default_factory=list)
    circuits_narrowed: list[str] = field(default_factory=list)  # fewer keys: they act on less
    not_separable: list[dict] = field(default_factory=list)  # {"circuit", "scope", "why"}

    def as_dict(self) -> dict:
        return {
            "keys_removed": self.keys_removed,
            "circuits_removed": self.circuits_removed,
            "circuits_narrowed": self.circuits_narrowed,
            "not_separable": self.not_separable,
        }


def forget_prompt(hierarchy: Hierarchy, agent_id: str, feature: torch.Tensor | None) -> ForgetReport:
    """Take out of ``agent_id``'s stack what it taught for the prompt whose route feature is ``feature``: every
    key of its own circuits the prompt reaches, and in shared scopes the reached keys only it put there.
    ``feature`` None (routing off): no circuit is gated, nothing is separable."""
    report = ForgetReport()
    if feature is None:
        for key in hierarchy.agent(agent_id).stack():
            for c in hierarchy.scopes[key].circuits.values() if key in hierarchy.scopes else ():
                if key.tier in OWN_TIERS or agent_id in c.origin_agents:
                    report.not_separable.append(_unseparable(c, key, "routing is off: it acts on every prompt"))
        return report
    for key in hierarchy.agent(agent_id).stack():
        scope = hierarchy.scopes.get(key)
        if scope is None:
            continue
        own = key.tier in OWN_TIERS
        for c in list(scope.circuits.values()):
            if c.gate is None:
                if own or agent_id in c.origin_agents:
                    report.not_separable.append(_unseparable(c, key, "ungated: it acts on every prompt"))
                continue
            reached = c.gate.reached_by(feature)
            if not bool(reached.any()):
                continue
            if own:
                _drop_keys(scope, c, reached, report)
                continue
            _drop_shared_keys(scope, c, reached, agent_id, key, report)
    return report


def forget_contributions(hierarchy: Hierarchy, agent_id: str) -> ForgetReport:
    """Take an agent's keys out of every shared circuit (its own tiers are deleted with it by the caller)."""
    report = ForgetReport()
    for key, scope in list(hierarchy.scopes.items()):
        if key.tier in OWN_TIERS:
            continue
        for c in list(scope.circuits.values()):
            if c.gate is None:
                if agent_id in c.origin_agents:
                    report.not_separable.append(_unseparable(c, key, "ungated: it acts on every prompt"))
                continue
            if agent_id in c.origin_agents or any(agent_id in o for o in c.gate.owners):
                everywhere = torch.ones(c.gate.keys.shape[0], dtype=torch.bool)
                _drop_shared_keys(scope, c, everywhere, agent_id, key, report)
    return report


def _drop_shared_keys(
    scope: Scope, c, reached: torch.Tensor, agent_id: str, key: ScopeKey, report: ForgetReport
) -> None:
    gate = c.gate
    if not gate.owners:
        if agent_id in c.origin_agents:
            report.not_separable.append(_unseparable(c, key, "its keys do not record who put them there"))
        return
    only = torch.tensor([gate.owners[i] == (agent_id,) for i in range(gate.keys.shape[0])])
    shared = torch.tensor([agent_id in gate.owners[i] and len(gate.owners[i]) > 1 for i in range(len(only))])
    drop = reached & only
    if bool((reached & shared).any()):
        report.not_separable.append(_unseparable(c, key, "other agents taught the same prompt"))
    owners = tuple(tuple(a for a in o if a != agent_id) if bool(reached[i]) else o for i, o in enumerate(gate.owners))
    if bool(drop.any()):
        if bool((~drop).any()):
            report.not_separable.append(_unseparable(c, key, "its delta also carries what its other keys taught"))
        _drop_keys(scope, c, drop, report, owners)
    elif owners != gate.owners:
        c.gate = replace(gate, owners=owners)  # who taught it changed, not where it acts
        scope.note()


def _drop_keys(scope: Scope, c, drop: torch.Tensor, report: ForgetReport, owners=None) -> None:
    keep = ~drop
    kept_owners = None if owners is None else tuple(o for o, k in zip(owners, keep.tolist()) if k)
    gate = c.gate.keeping(keep, kept_owners)
    report.keys_removed += int(drop.sum())
    if gate is None:
        scope.remove(c.id)
        report.circuits_removed.append(c.id)
    else:
        c.gate = gate
        scope.touch()
        report.circuits_narrowed.append(c.id)


def _unseparable(c, key: ScopeKey, why: str) -> dict:
    return {"circuit": c.id, "scope": str(key), "why": why}
