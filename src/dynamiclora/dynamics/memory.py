"""The tick: usage series → phases (with hysteresis) → decay and forgetting → migration upward.

Per tick and per circuit: the closed tick's use (0/1) is appended to its series; its usage statistic u is the
fraction of used ticks over the tier's horizon (set by homeostasis); u ≥ θ_on makes it SCREENED, u ≤ θ_off
FREE, in between nothing changes (hysteresis). Use strengthens, disuse weakens: a circuit used in a tick is
back at full vigor, an unused one loses ``decay`` of its vigor (SCREENED ones only ``screened_decay_ratio`` of
that); below ``forget_below`` it is deleted and the forgetting logged. An ungated circuit acts at its vigor, rounded
to a step; a gated one acts whole until it is forgotten: its gate already keeps it to its own inputs, and a fact at
part strength is a wrong answer there, not a fainter one (docs/memory-dynamics.md). Context
circuits whose use persists across the window (see detector.py) move to their agent's tier, at most
``bandwidth`` per tick, best stability first; critical ones skip the queue. Detector windows derive from
measured figures (timescales.py): a tier's own memory span and the time scale of the faster tier below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..circuits import Circuit
from ..config import TIERS, DynamicsConfig
from ..eventlog import EventLog
from ..hierarchy import Clock, Hierarchy, Scope, ScopeKey
from .detector import Persistence, persistence
from .homeostasis import Homeostasis
from .sharing import Sharing
from .timescales import Scale, Timescales

SCREENED, FREE = "SCREENED", "FREE"
MAX_SERIES = 1024  # ticks of use history kept per circuit


def stepped(vigor: float, step: float) -> float:
    """Vigor rounded up to the grid 1, step, step², …: the strength a circuit acts with."""
    if vigor >= 1.0:
        return 1.0
    k = math.floor(math.log(vigor) / math.log(step) + 1e-9)
    return step**k


@dataclass
class TickReport:
    tick: int
    transitions: list[dict[str, Any]] = field(default_factory=list)
    forgotten: list[dict[str, Any]] = field(default_factory=list)
    migrated: list[dict[str, Any]] = field(default_factory=list)
    queued: list[tuple[str, float]] = field(default_factory=list)  # (circuit id, stability) still waiting
    consolidated: list[dict[str, Any]] = field(default_factory=list)  # WaveGen internalizations (see wavegen)
    shared: list[dict[str, Any]] = field(default_factory=list)  # resonance consensus per shared scope (sharing.py)


class Memory:
    def __init__(
        self, hierarchy: Hierarchy, config: DynamicsConfig, clock: Clock, place: Callable[[ScopeKey, Circuit], Circuit]
    ) -> None:
        self.hierarchy, self.config, self.clock, self.place = hierarchy, config, clock, place
        self.on_leave: Callable[[str], None] = lambda circuit_id: None  # a circuit left its scope
        self.homeostasis = Homeostasis(self.config)
        self.timescales = Timescales()
        self.migrations = EventLog()
        self.forgotten = EventLog()
        self.queue: list[tuple[str, float]] = []
        self.sharing = Sharing(self)
        self.sync_usage: Callable[[], None] | None = None  # distributed: sums shared circuits' uses over ranks

    # -- observation ----------------------------------------------------------------------------------
    def record_use(self, circuit: Circuit) -> None:
        circuit.uses_this_tick += 1
        self.hierarchy.note(circuit)

    def tier_circuits(self, tier: str) -> list[tuple[Scope, Circuit]]:
        return [(s, c) for k, s in self.hierarchy.scopes.items() if k.tier == tier for c in s.circuits.values()]

    def timescale(self, tier: str) -> Scale:
        now = self.clock.tick
        return self.timescales.measure(tier, [now - c.entered_tick for _, c in self.tier_circuits(tier)])

    def window(self, tier: str) -> int:
        """The detector window of a tier, in ticks: ``window_scale`` × the longer of the tier's own memory span
        (persistence means outliving ordinary forgetting) and the time scale of the faster tier below it, whose
        circuits it receives (what belongs to a slower tier must outlast the faster one); ``window_min`` while
        neither is known."""
        faster = TIERS.index(tier) + 1  # TIERS runs slow to fast
        below = self.timescale(TIERS[faster]).ticks if faster < len(TIERS) else None
        measured = [m for m in (self.timescales.span(tier), below) if m is not None]
        if not measured:
            return self.config.window_min
        return min(max(self.config.window_min, math.ceil(self.config.window_scale * max(measured))), MAX_SERIES)

    def persistence(self, circuit: Circuit, window: int | None = None) -> Persistence:
        """The detector's verdict on a circuit, over ``window`` ticks (default: its tier's current window)."""
        cfg = self.config
        window = self.window(circuit.tier) if window is None else window
        return persistence(circuit.series, window, cfg.blocks, cfg.min_coverage, cfg.min_autocorrelation)

    # -- the tick -------------------------------------------------------------------------------------
    def tick(self) -> TickReport:
        cfg = self.config
        now = self.clock.tick
        report = TickReport(now)
        if self.sync_usage is not None:
            self.sync_usage()
        for c in self.hierarchy.all_circuits():
            c.series.append(1 if c.uses_this_tick else 0)
            del c.series[:-MAX_SERIES]
        for tier in TIERS:
            members = self.tier_circuits(tier)
            self.homeostasis.update(tier, [c.phase for _, c in members])
            reg = self.homeostasis.tiers[tier]
            # u averages over the tier's homeostatic horizon, not over the detector window: windows derive from
            # spans, spans from decay, and decay from the phases u decides, which would close a runaway loop
            horizon = max(1, round(cfg.window_min * reg.horizon))
            for scope, c in members:
                c.u = sum(c.series[-horizon:]) / horizon  # ticks before a circuit existed count as unused
                phase = SCREENED if c.u >= reg.theta_on else FREE if c.u <= reg.theta_off else c.phase
                if phase != c.phase:
                    event = {"event": "phase", "from": c.phase, "to": phase, "tick": now, "u": round(c.u, 4)}
                    c.history.append(event)
                    report.transitions.append({"circuit": c.id, **event})
                    c.phase = phase
                used, c.uses_this_tick = c.uses_this_tick, 0
                if c.pinned:  # imported or added by hand: only its owner removes it
                    continue
                if used:  # use rehearses: back to full vigor
                    c.vigor = 1.0
                else:  # disuse weakens
                    c.vigor *= 1.0 - reg.decay * (cfg.screened_decay_ratio if c.phase == SCREENED else 1.0)
                if c.vigor < cfg.forget_below:
                    self._forget(scope, c, report)
                    continue
                if not c.scale_on_entry:
                    continue
                # an ungated circuit acts at its vigor, rounded to a step; a gated one whole until it is forgotten
                scale = c.scale_on_entry * (1.0 if c.gate is not None else stepped(c.vigor, cfg.strength_step))
                if scale != c.scale:  # content changes only when the strength crosses a step
                    c.scale = scale
                    scope.touch()
        self._migrate(report)
        self.sharing.step(report)
        for scope in self.hierarchy.scopes.values():  # every record moved on (series, u, phase, vigor)
            if scope.circuits:
                scope.note()
        self.clock.tick += 1
        return report

    def _leave(self, scope: Scope, c: Circuit, forgotten: bool) -> int:
        """A circuit leaves its tier (forgotten or migrating): its residence is measured; returns the tick."""
        now = self.clock.tick
        scope.remove(c.id)
        self.on_leave(c.id)  # (the learner drops its optimizer)
        self.timescales.left(c.tier, now - c.entered_tick, forgotten=forgotten)
        return now

    def _forget(self, scope: Scope, c: Circuit, report: TickReport) -> None:
        now = self._leave(scope, c, forgotten=True)
        entry = {
            "circuit": c.id,
            "tier": c.tier,
            "scope": c.scope,
            "tick": now,
            "label": c.label,
            "strength": c.strength,
        }
        self.forgotten.append(entry)
        report.forgotten.append(entry)

    def _migrate(self, report: TickReport) -> None:
        """Context → agent (the owner's own tier). Shared tiers above change only through consensus (sharing.py)."""
        critical, candidates = [], []
        window = self.window("context")  # one window for the whole tier in this tick
        for scope, c in self.tier_circuits("context"):
            if c.critical:
                critical.append((scope, c, None))
                continue
            p = self.persistence(c, window)
            if p.qualifies:
                candidates.append((scope, c, p))
        candidates.sort(key=lambda item: (-item[2].score, item[1].created_tick, item[1].id))
        chosen = critical + candidates[: self.config.bandwidth]
        self.queue = [(c.id, p.score) for _, c, p in candidates[self.config.bandwidth :]]
        report.queued = list(self.queue)
        for scope, c, p in chosen:
            self.move(c, scope, self.hierarchy.scope(ScopeKey("agent", c.scope)), p, report)

    def move(
        self, c: Circuit, source: Scope, target: Scope, p: Persistence | None, report: TickReport | None = None
    ) -> dict[str, Any]:
        """Move a circuit whole from one scope to another; the owner's outputs do not change."""
        now = self._leave(source, c, forgotten=False)
        entry = {
            "circuit": c.id,
            "from": str(source.key),
            "to": str(target.key),
            "tick": now,
            "label": c.label,
            "critical": c.critical,
            "score": None if p is None else round(p.score, 4),
            "coverage": None if p is None else p.coverage,
            "autocorrelation": None if p is None else round(p.autocorrelation, 4),
        }
        c.history.append({"event": "migrated", **{k: v for k, v in entry.items() if k != "circuit"}})
        c.entered_tick, c.scale_on_entry, c.vigor = now, c.scale, 1.0
        target.add(c)
        self.migrations.append(entry)
        if report is not None:
            report.migrated.append(entry)
        return entry

    def scales(self) -> dict[str, dict]:
        """Per tier: the measured time scale (mean residence in ticks by Little's law; ``lower_bound`` while
        nothing has left the tier), the detector window, the number of circuits, the SCREENED fraction and the
        current (homeostatic) thresholds."""
        out = {}
        for tier in TIERS:
            members = [c for _, c in self.tier_circuits(tier)]
            reg = self.homeostasis.tiers[tier]
            scale = self.timescale(tier)
            out[tier] = {
                "ticks": scale.ticks,
                "lower_bound": scale.lower_bound,
                "window": self.window(tier),
                "circuits": len(members),
                "screened_fraction": sum(c.phase == SCREENED for c in members) / len(members) if members else 0.0,
                "left": len(self.timescales.residences[tier]),
                "span": self.timescales.span(tier),
                "theta_on": reg.theta_on,
                "theta_off": reg.theta_off,
                "decay": reg.decay,
            }
        return out

    # -- persistence ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "homeostasis": self.homeostasis.state(),
            "timescales": self.timescales.state(),
            "queue": self.queue,
        }

    def restore(self, state: dict[str, Any], migrations: EventLog, forgotten: EventLog, sharing_log: EventLog) -> None:
        self.homeostasis.restore(state.get("homeostasis", {}))
        self.timescales.restore(state.get("timescales", {}))
        self.queue = [tuple(q) for q in state.get("queue", [])]
        self.sharing.log = sharing_log
        self.migrations, self.forgotten = migrations, forgotten
