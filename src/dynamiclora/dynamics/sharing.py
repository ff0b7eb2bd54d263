"""The tick's sharing step: circuits that proved themselves move into shared scopes by resonance consensus.

Proposals come from two places: circuits of the agent, swarm and domain tiers whose use persisted across their
tier's window *while in that tier* (so each tier adds its own residence before the next can be reached), and
WaveGen consolidations of swarm/domain/foundation cache entries (queued with :meth:`Sharing.propose`). In a
distributed run the proposals of every rank are gathered first (see dynamics.distributed), so every rank sees
the same list in the same order and applies the same rule.

Per target scope (at most ``bandwidth`` target scopes per tier per tick; critical proposals first, then by
stability) the resonance rule (resonance.py) decides who enters and with which weights. One shared circuit per
resonating group is added to the target; each contributing owner scope gives up its entering circuits of that
group and keeps the residual ``Σ Δ_own − Δ_shared``, so **no contributor's output changes by its own pattern**
(sum invariance, as in migration), while every other member of the target scope gains the shared circuit. A
residual is never proposed to the same scope again, so a lone pusher cannot reach it by repetition either.
Proposals that do not enter wait in their tier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..circuits import Circuit, frobenius_inner, inner_products
from ..config import TIERS
from ..eventlog import EventLog
from ..gates import covers as gate_covers
from ..gates import union
from ..hierarchy import FOUNDATION, ScopeKey
from .resonance import Proposal, combine, gram, norm, resonate

if TYPE_CHECKING:
    from .memory import Memory, TickReport

RESIDUAL_TOLERANCE = 1e-4  # residuals below this fraction of the owner's delta are dropped (the owner changes less)
SOURCE_TIERS = ("agent", "swarm", "domain")

#: Gathers every rank's proposals (and shared-circuit uses) in a distributed run; identity otherwise.
Exchange = Callable[[list[Proposal]], list[Proposal]]


@dataclass
class _Target:
    key: ScopeKey
    proposals: list[Proposal]

    @property
    def priority(self) -> tuple:
        return (
            not any(p.critical for p in self.proposals),
            -max(p.stability for p in self.proposals),
            str(self.key),
        )


def circuit_digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Sharing:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.pending: list[Proposal] = []  # WaveGen consolidations waiting for the next tick
        self.exchange: Exchange | None = None
        self.log = EventLog()  # one record per consensus that changed a scope (who entered, who waited)

    # -- proposals ------------------------------------------------------------------------------------
    def propose(self, proposal: Proposal) -> None:
        """Queue a circuit that lives in no scope (a cache consolidation) for the next tick's consensus."""
        self.pending.append(proposal)

    def target_of(self, key: ScopeKey) -> ScopeKey | None:
        """The shared scope a scope's circuits move up into."""
        h = self.memory.hierarchy
        if key.tier == "agent":
            return ScopeKey("swarm", h.agent(key.name).swarm) if key.name in h.agents else None
        if key.tier == "swarm":
            domain = h.swarm_domain(key.name)
            return None if domain is None else ScopeKey("domain", domain)
        if key.tier == "domain":
            return FOUNDATION
        return None

    def local_proposals(self) -> list[Proposal]:
        """This process's circuits that qualify to move up, and its pending consolidations."""
        mem = self.memory
        now = mem.clock.tick
        out = []
        windows = {tier: mem.window(tier) for tier in SOURCE_TIERS}
        for key, scope in sorted(mem.hierarchy.scopes.items(), key=lambda kv: str(kv[0])):
            if key.tier not in SOURCE_TIERS or not scope.circuits:
                continue
            target = self.target_of(key)
            if target is None:
                continue
            window = windows[key.tier]
            for c in sorted(scope.circuits.values(), key=lambda c: c.id):
                if c.residual_of == str(target) or not (c.critical or now - c.entered_tick >= window):
                    continue  # evidence must be gathered in this tier: a window of residence first
                p = mem.persistence(c, window)
                if c.critical or p.qualifies:
                    out.append(Proposal(c, frozenset({key.name}), str(key), p.score, c.critical, str(target)))
        out.extend(self.pending)
        self.pending = []
        return out

    # -- the step -------------------------------------------------------------------------------------
    def step(self, report: TickReport) -> None:
        proposals = self.local_proposals()
        if self.exchange is not None:
            proposals = self.exchange(proposals)
        targets: dict[str, _Target] = {}
        for p in proposals:
            targets.setdefault(p.target, _Target(ScopeKey.parse(p.target), [])).proposals.append(p)
        bandwidth = self.memory.config.bandwidth
        for tier in ("swarm", "domain", "foundation"):
            ordered = sorted((t for t in targets.values() if t.key.tier == tier), key=lambda t: t.priority)
            for i, t in enumerate(ordered):
                t.proposals.sort(key=lambda p: (sorted(p.contributors), p.circuit.content_hash()))
                if i < bandwidth or any(p.critical for p in t.proposals):
                    self.consensus(t.key, t.proposals, report)
                else:  # over the bandwidth: these proposals wait in their tiers (and pending ones for the next tick)
                    self.pending.extend(p for p in t.proposals if not p.owner)

    def consensus(self, key: ScopeKey, proposals: list[Proposal], report: TickReport | None = None) -> list[Circuit]:
        """Apply the resonance rule to proposals bound for ``key``; returns the shared circuits it added: one per
        group of resonating proposals (so two patterns that arrive in the same tick stay two circuits, each free
        to move on by itself)."""
        mem, cfg = self.memory, self.memory.config
        now = mem.clock.tick
        scope = mem.hierarchy.scopes.get(key)
        held = sorted(scope.circuits.values(), key=lambda c: c.id) if scope is not None else []
        absorbed = self._absorb(key, proposals, held, report)
        proposals = [p for p in proposals if id(p) not in absorbed]
        result = resonate(proposals, cfg.resonance_threshold, cfg.resonance_gain, cfg.resonance_max_gain)
        record: dict[str, Any] = {
            "scope": str(key),
            "tick": now,
            "absorbed": list(absorbed.values()),
            "proposals": [
                {
                    "circuit": p.circuit.id,
                    "from": p.owner or "cache",
                    "contributors": sorted(p.contributors),
                    "support": round(v.support, 4),
                    "opposition": round(v.opposition, 4),
                    "weight": round(v.weight, 4),
                    "resonant_fraction": round(v.resonant_fraction, 4),
                    "entered": v.enters,
                }
                for p, v in zip(proposals, result.verdicts)
            ],
            "shared": [],
        }
        added = []
        for group in result.groups(cfg.resonance_threshold):
            entered = [proposals[i] for i in group if result.verdicts[i].enters]
            terms = [(proposals[i].circuit, float(result.coefficients[i])) for i in group]
            digests = sorted(p.circuit.content_hash() for p in entered)
            shared = Circuit(
                factors=combine(terms),
                tier=key.tier,
                scope=key.name,
                id=circuit_digest("shared", str(key), str(now), *digests),
                created_tick=now,
                gate=union([c.gate for c, _ in terms]),
            )
            self._inherit(shared, entered)
            shared.history.append(
                {
                    "event": "consensus",
                    "tick": now,
                    "from": sorted({p.owner or "cache" for p in entered}),
                    "contributors": sorted(set().union(*(p.contributors for p in entered))),
                }
            )
            mem.place(key, shared)
            added.append(shared)
            made_of = [p.circuit.id for p in entered]
            record["shared"].append({"circuit": shared.id, "rank": shared.rank, "from": made_of})
            for owner in sorted({p.owner for p in entered if p.owner}):
                mine = [p for p in entered if p.owner == owner]
                self._replace(owner, mine, [(shared, -1.0)], key, "consensus", shared.id, report)
            record["absorbed"].extend(self._absorb_members(key, shared, report))
        if added or record["absorbed"]:  # proposals that only waited are reported, not kept
            self.log.append(record)
        if report is not None:
            report.shared.append(record)
        return added

    @staticmethod
    def _inherit(new: Circuit, sources: list[Proposal]) -> None:
        """Record, phase, usage series and examples of the circuits a consensus circuit is made from."""
        circuits = [p.circuit for p in sources]
        new.origin_agents = sorted({a for c in circuits for a in c.origin_agents})
        new.critical = any(c.critical for c in circuits)
        new.phase = "SCREENED" if any(c.phase == "SCREENED" for c in circuits) else "FREE"
        length = max(len(c.series) for c in circuits)
        padded = [[0] * (length - len(c.series)) + c.series for c in circuits]
        new.series = [max(col) for col in zip(*padded)] if padded else []
        selves = [c.key_self for c in circuits if c.key_self is not None]
        new.key_self = max(selves) if selves else None
        for c in circuits:
            for activation, prompt, completion in c.examples:
                new.observe_example(activation, prompt, completion)

    def _absorb(
        self,
        key: ScopeKey,
        proposals: list[Proposal],
        existing: list[Circuit],
        report: TickReport | None,
        keep_outputs: bool = False,
    ) -> dict[int, dict]:
        """Proposals that resonate with a circuit the target holds are not added again. Returns {id(p): record}.

        A proposal bound for a scope that already held the circuit (its owner ran with both: the pattern twice)
        drops the part the shared circuit says, its projection on it, and keeps the rest. With ``keep_outputs``
        (the shared circuit is new to the owner) the owner keeps ``Δ_own − Δ_shared`` instead: with the shared
        circuit it runs exactly as before, as a consensus contributor does."""
        out: dict[int, dict] = {}
        if not existing:
            return out
        threshold = self.memory.config.resonance_threshold
        squared = torch.tensor([frobenius_inner(x, x) for x in existing], dtype=torch.float64).clamp_min(1e-30)
        cross = inner_products([p.circuit for p in proposals], existing)  # (proposals, existing), one pass per module
        for row, p in enumerate(proposals):
            inner = cross[row]
            own = frobenius_inner(p.circuit, p.circuit)
            cos = inner / (squared.sqrt() * max(own, 1e-30) ** 0.5)
            best = int(cos.argmax())
            if float(cos[best]) < threshold:
                continue
            x = existing[best]
            if not gate_covers(x.gate, p.circuit.gate):
                continue  # the shared circuit does not act on all of this one's prompts: it does not say it there
            projection = 1.0 if keep_outputs else float(inner[best] / squared[best])
            out[id(p)] = {
                "circuit": p.circuit.id,
                "from": p.owner or "cache",
                "into": x.id,
                "cosine": round(float(cos[best]), 4),
            }
            if p.owner:
                self._replace(p.owner, [p], [(x, -projection)], key, "absorbed", x.id, report)
            x.origin_agents = sorted(set(x.origin_agents) | set(p.circuit.origin_agents))
        return out

    def _members(self, key: ScopeKey) -> list[ScopeKey]:
        """The faster scopes whose agents' stacks include ``key`` (local ones only)."""
        h = self.memory.hierarchy
        below = TIERS[TIERS.index(key.tier) + 1 :]
        keys = {k for info in h.agents.values() if key in info.stack() for k in info.stack() if k.tier in below}
        return sorted((k for k in keys if k in h.scopes), key=str)

    def _absorb_members(self, key: ScopeKey, shared: Circuit, report: TickReport | None) -> list[dict]:
        """When a shared scope gains a circuit, its members' own copies of the pattern (circuits resonating with it)
        give it up: each keeps ``Δ_copy − Δ_shared``, so that no member carries the pattern twice and no member's
        output changes on the prompts its copy acts on (the shared circuit acts on all of them)."""
        h = self.memory.hierarchy
        copies = [
            Proposal(c, frozenset(), str(k), 0.0, False, str(key))
            for k in self._members(key)
            for c in sorted(h.scopes[k].circuits.values(), key=lambda c: c.id)
            if c.residual_of != str(key)
        ]
        return list(self._absorb(key, copies, [shared], report, keep_outputs=True).values())

    def _replace(
        self,
        owner: str,
        leaving: list[Proposal],
        minus: list[tuple[Circuit, float]],
        target: ScopeKey,
        kind: str,
        via: str,
        report: TickReport | None,
    ) -> None:
        """The owner scope gives up its ``leaving`` circuits and keeps ``Σ Δ_leaving + Σ coef·Δ`` over ``minus``.

        After a consensus ``minus`` is the new shared circuit with −1: the owner's output does not change. After an
        absorption it is the projection on the shared circuit that already carried the pattern twice."""
        mem = self.memory
        key = ScopeKey.parse(owner)
        scope = mem.hierarchy.scopes.get(key)
        if scope is None:  # another rank's scope: that rank applies it
            return
        own = [(p.circuit, 1.0) for p in leaving]
        residual = Circuit(
            factors=combine(own + minus),
            tier=key.tier,
            scope=key.name,
            id=circuit_digest("residual", via, owner, *(p.circuit.id for p in leaving)),
            created_tick=mem.clock.tick,
            residual_of=str(target),
        )
        reference = max(float(gram([p.circuit for p in leaving]).sum()), 0.0) ** 0.5  # ‖Σ Δ_leaving‖
        self._inherit(residual, leaving)
        residual.gate = union([p.circuit.gate for p in leaving])  # it acts where the owner's circuits did
        for p in leaving:
            local = scope.circuits.get(p.circuit.id)
            if local is None:
                continue
            mem._leave(scope, local, forgotten=False)
            entry = {
                "circuit": local.id,
                "from": owner,
                "to": str(target),
                "tick": mem.clock.tick,
                "label": local.label,
                "critical": local.critical,
                "score": round(p.stability, 4),
                "coverage": None,
                "autocorrelation": None,
                "kind": kind,
                "shared": via,
            }
            local.history.append({"event": "migrated", **{k: v for k, v in entry.items() if k != "circuit"}})
            mem.migrations.append(entry)
            if report is not None:
                report.migrated.append(entry)
        if norm(residual) > RESIDUAL_TOLERANCE * reference:
            residual.history.append({"event": "residual", "tick": mem.clock.tick, "of": via, "scope": str(target)})
            mem.place(key, residual)
