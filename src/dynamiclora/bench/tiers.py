"""A team stream on which all five tiers come into play, for measuring the time scales they exhibit.

Two domains, two swarms each, two agents per swarm. Every agent meets patterns of four breadths, each recurring
at its own period: one the whole team uses (every 2 ticks), one per domain (every 3), one per swarm (every 4) and
one habit of its own (every 5); plus short sessions: a new pattern used in a burst of 3 ticks, every 7 ticks,
never again. A pattern is a direction in weight space; each agent meets it as its own noisy copy (a random
circuit on every adapted module of a real model).

A use goes where ``learn`` would send it: to the circuit of the agent's stack that carries the pattern (cosine
≥ 0.5, the resonance threshold), or, if none does, to a new context circuit. Everything after that is the
library's own tick: phases, decay and forgetting, context → agent migration, resonance consensus into the swarm,
domain and foundation. Nothing here sets a time scale; the measured ones come out of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..circuits import Circuit, frobenius_inner
from ..config import TIERS, DynamicLoRAConfig, DynamicsConfig
from ..core import DynamicLoRA
from ..testing import tiny_model

TEAM = {  # agent: (swarm, domain)
    "a1": ("s1", "d1"), "a2": ("s1", "d1"), "b1": ("s2", "d1"), "b2": ("s2", "d1"),
    "c1": ("s3", "d2"), "c2": ("s3", "d2"), "e1": ("s4", "d2"), "e2": ("s4", "d2"),
}  # fmt: skip
PERIODS = {"team": 2, "domain": 3, "swarm": 3, "habit": 4}
SESSION_EVERY, SESSION_BURST = 10, 4
NOISE = 0.3  # an agent's copy of a pattern: the pattern plus this much (relative) noise


def _direction(dl: DynamicLoRA, g: torch.Generator, rank: int = 4, magnitude: float = 0.05) -> dict:
    return {
        n: (
            torch.randn(rank, layer.in_features, generator=g) * magnitude,
            torch.randn(layer.out_features, rank, generator=g) * magnitude,
        )
        for n, layer in dl.layers.items()
    }


def _noisy(factors: dict, g: torch.Generator) -> Circuit:
    return Circuit(
        factors={
            n: (a + NOISE * a.std() * torch.randn(a.shape, generator=g), b.clone()) for n, (a, b) in factors.items()
        },
        tier="context",
        scope="",
    )


def _cosine(x: Circuit, y: Circuit) -> float:
    return frobenius_inner(x, y) / max(frobenius_inner(x, x) * frobenius_inner(y, y), 1e-30) ** 0.5


@dataclass
class TeamStream:
    dl: DynamicLoRA
    seed: int = 0
    patterns: dict[str, dict] = field(default_factory=dict)  # name -> factors
    carriers: dict[tuple[str, str], str] = field(default_factory=dict)  # (agent, pattern) -> circuit id

    def __post_init__(self) -> None:
        self.g = torch.Generator().manual_seed(self.seed)
        for agent, (swarm, domain) in TEAM.items():
            self.dl.agent(agent, swarm=swarm, domain=domain)

    def pattern(self, name: str) -> dict:
        if name not in self.patterns:
            self.patterns[name] = _direction(self.dl, self.g)
        return self.patterns[name]

    def use(self, agent: str, name: str) -> None:
        """The interaction that uses pattern ``name``: rehearse its carrier, or learn it into a new context circuit."""
        h = self.dl.hierarchy
        scopes = [h.scopes[key] for key in h.agent(agent).stack() if key in h.scopes]
        circuits = {c.id: c for scope in scopes for c in scope.circuits.values()}
        carrier = circuits.get(self.carriers.get((agent, name), ""))
        if carrier is None:
            probe = Circuit(factors=self.pattern(name), tier="", scope="")
            cosine, best = max(((_cosine(probe, c), c.id) for c in circuits.values()), default=(0.0, ""))
            if cosine >= self.dl.config.dynamics.resonance_threshold:
                carrier = circuits[best]
            else:
                carrier = self.dl.add_circuit(f"context:{agent}", _noisy(self.pattern(name), self.g), pinned=False)
            self.carriers[(agent, name)] = carrier.id
        self.dl.memory.record_use(carrier)

    def step(self, t: int) -> None:
        for i, (agent, (swarm, domain)) in enumerate(TEAM.items()):
            for breadth, name in (("team", "team"), ("domain", domain), ("swarm", swarm), ("habit", agent)):
                if (t + i) % PERIODS[breadth] == 0:
                    self.use(agent, f"{breadth}:{name}")
            session = (t + i) // SESSION_EVERY
            if (t + i) % SESSION_EVERY < SESSION_BURST:
                self.use(agent, f"session:{agent}:{session}")
        self.dl.tick()  # a carrier that migrated keeps its id; one that was merged or forgotten is looked up again


STREAM_TICKS = 600
SEPARATION = 1.2  # each tier's measured scale at least this many times the faster one's (the test's bound)


def run_stream(ticks: int, seed: int = 0, **dynamics) -> DynamicLoRA:
    model, tok = tiny_model("llama")
    dl = DynamicLoRA(model, tok, DynamicLoRAConfig(dynamics=DynamicsConfig(tick_interval=0, **dynamics)))
    stream = TeamStream(dl, seed)
    for t in range(ticks):
        stream.step(t)
    return dl


def tier_timescales(ticks: int = STREAM_TICKS, seeds: int = 1, **dynamics) -> dict:
    """The time scale of each tier after ``ticks`` of the team stream, per seed, and the ratios between tiers."""
    runs = []
    for seed in range(seeds):
        dl = run_stream(ticks, seed, **dynamics)
        scales = dl.timescales()
        fast_to_slow = list(reversed(TIERS))
        measured = [scales[t]["ticks"] for t in fast_to_slow]
        runs.append(
            {
                "seed": seed,
                "per_tier": scales,
                "ratios": {
                    f"{slow}/{fast}": (b / a if a and b else None)
                    for fast, slow, a, b in zip(fast_to_slow, fast_to_slow[1:], measured, measured[1:])
                },
                "migrations": len(dl.migrations()),
                "forgotten": len(dl.forgotten()),
                "consensus": len(dl.memory.sharing.log),
            }
        )
    return {"ticks": ticks, "runs": runs}


def timescale_checks(result: dict) -> dict[str, bool]:
    """Ordered context < agent < swarm < domain < foundation and separated by SEPARATION, in every run. A tier
    from which nothing ever left reports a lower bound, which still has to clear the bound."""
    ok = all(r is not None and r >= SEPARATION for run in result["runs"] for r in run["ratios"].values())
    return {f"time scales ordered and separated (each ≥ {SEPARATION}× the faster tier's), every seed": ok}


def timescale_table(result: dict) -> list[str]:
    runs = result["runs"]
    md = [
        f"Time scales on the team stream ({result['ticks']} ticks, {len(runs)} seed(s); mean residence in ticks by "
        "Little's law, ≥ where nothing has left the tier yet):",
        "",
        "| tier | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | detector window (seed 0) | circuits |",
        "|---|" + "---|" * len(runs) + "---|---|",
    ]
    for tier in reversed(TIERS):
        cells = [
            ("≥ " if r["per_tier"][tier]["lower_bound"] else "") + f"{r['per_tier'][tier]['ticks'] or 0:.0f}"
            for r in runs
        ]
        first = runs[0]["per_tier"][tier]
        md.append(f"| {tier} | " + " | ".join(cells) + f" | {first['window']} | {first['circuits']} |")
    md += ["", "| ratio | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for name in runs[0]["ratios"]:
        md.append(f"| {name} | " + " | ".join(f"{r['ratios'][name] or 0:.2f}" for r in runs) + " |")
    return md


def plot_timescales(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fast_to_slow = list(reversed(TIERS))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in result["runs"]:
        values = [run["per_tier"][t]["ticks"] or 0 for t in fast_to_slow]
        ax.plot(fast_to_slow, values, marker="o", label=f"seed {run['seed']}")
        for t, v in zip(fast_to_slow, values):
            if run["per_tier"][t]["lower_bound"]:
                ax.annotate("≥", (t, v), textcoords="offset points", xytext=(6, 4))
    ax.set_yscale("log")
    ax.set_ylabel("mean residence (ticks)")
    ax.set_title(f"measured time scale per tier ({result['ticks']} ticks of the team stream)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
