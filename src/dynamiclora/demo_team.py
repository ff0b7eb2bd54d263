"""The team scenario of the WaveGen seed ("write a Python JSON parser"), end to end, as a chat.

Ana learns the team's JSON parser and keeps asking for it: her first request misses and is stored, the next ones
hit; her context circuit becomes SCREENED. Ben, of the same swarm, learns the same pattern a few rounds later and
asks for it too, so the entry moves to the swarm tier of the cache (two requesters) and its hit rate climbs. The
tick internalizes it and offers the circuit to the swarm scope by resonance consensus, with Ana and Ben as its
contributors; their own copies resonate with the new shared circuit and are absorbed into it (no one carries the
pattern twice); the next consolidation finds the swarm tier producing the entry and evicts it. New agents Cy, Dee
and Eve of the swarm then produce the parser on their first request without any cache; Finn, of another swarm,
does not.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import DynamicLoRA
from .demo_common import ask

PROMPT = "Write a Python JSON parser."
PARSER = "```python\nimport json\n\n\ndef parse_json(text):\n    return json.loads(text)\n```"
SWARM, OTHER, DOMAIN = "json-team", "web-team", "python"
LEARN_ROUNDS = 2  # each agent learns the parser in its first rounds, then only asks for it


def run_team(dl: DynamicLoRA, state_dir: Path, console: Console, rounds: int = 32, window: int = 8) -> dict:
    """Run the scenario on ``dl`` (one tick per round, detector windows of ``window`` ticks); returns its checks."""
    cfg = dl.config.dynamics  # changed in place: the memory holds this object
    saved = (cfg.tick_interval, cfg.window_min, cfg.blocks)
    cfg.tick_interval, cfg.window_min, cfg.blocks = 0, window, min(cfg.blocks, window)
    try:
        return _run(dl, state_dir, console, rounds)
    finally:
        cfg.tick_interval, cfg.window_min, cfg.blocks = saved


def _run(dl: DynamicLoRA, state_dir: Path, console: Console, rounds: int) -> dict:
    ana = dl.agent("ana", swarm=SWARM, domain=DOMAIN)
    ben = dl.agent("ben", swarm=SWARM, domain=DOMAIN)
    max_new = len(dl.encode(PARSER, special=False)) + 4
    events: list[tuple[int, str, str, str]] = []  # (tick, lane, event, detail)
    requests: list[tuple[int, str, str]] = []  # (tick, agent, cache outcome)
    first_tick = dl.tick_count
    joins = {ana: 0, ben: 3}  # the round each agent comes upon the pattern
    for r in range(rounds):
        tick = dl.tick_count
        for agent in [a for a, start in joins.items() if r >= start]:
            if r - joins[agent] < LEARN_ROUNDS:  # learned in its first rounds, then only asked for
                learned = agent.learn(messages=ask(PROMPT), completion=PARSER)
                if r == joins[agent]:
                    events.append((tick, agent.id, "learns", f"circuit {learned.circuit_id[:8]}"))
            result = agent.chat(ask(PROMPT), max_new_tokens=max_new)
            requests.append((tick, agent.id, result.cache))
        report = dl.tick()
        ours = {"context:ana", "context:ben", "agent:ana", "agent:ben", f"swarm:{SWARM}"}
        for t in report.transitions:
            scope = _scope_of(dl, t["circuit"])
            if scope in ours:
                events.append((tick, scope.split(":")[1] if scope != f"swarm:{SWARM}" else "swarm", t["to"], scope))
        cosines = {a["circuit"]: a["cosine"] for s in report.shared for a in s["absorbed"]}
        for m in report.migrated:
            if m["from"] in ours:
                lane = m["from"].split(":")[1]
                cos = (
                    f" (cos {cosines[m['circuit']]:.2f} with the shared circuit)"
                    if m.get("kind") == "absorbed"
                    else ""
                )
                events.append((tick, lane, m.get("kind") or "migrated", f"{m['from']} → {m['to']}{cos}"))
        for c in report.consolidated:
            if c.get("scope") == f"swarm:{SWARM}" or c["agent"] in ("ana", "ben"):
                outcome = "evicted (in the weights)" if c["outcome"] == "already" else c["outcome"]
                events.append((tick, "cache", outcome, f"{c['tier']} entry, hit rate {c['hit_rate']:.2f}"))
        for s in report.shared:
            if s["scope"] == f"swarm:{SWARM}" and s.get("shared"):
                who = sorted({w for p in s["proposals"] if p["entered"] for w in p["contributors"]})
                into = ", ".join(x["circuit"][:8] for x in s["shared"])
                events.append((tick, "swarm", "consensus", f"contributors {', '.join(who)} → {into}"))

    table = Table(title=f"the team scenario: '{PROMPT}' (one tick per round)")
    for col in ("tick", "who", "event", "detail"):
        table.add_column(col, overflow="fold")
    shown = [(tick, agent_id, "request", f"cache: {cache}") for tick, agent_id, cache in requests[:6]]
    for tick, lane, event, detail in sorted(shown + events, key=lambda e: e[0]):
        table.add_row(str(tick), lane, event, detail)
    console.print(table)

    first = {}
    for name, swarm in (("cy", SWARM), ("dee", SWARM), ("eve", SWARM), ("finn", OTHER)):
        first[name] = dl.agent(name, swarm=swarm, domain=DOMAIN).chat(
            ask(PROMPT), max_new_tokens=max_new, use_cache=False
        )
    inherited = {n: first[n].text == PARSER for n in first}
    kinds = {e[2] for e in events}
    shared_records = [s for s in dl.memory.sharing.log if s["scope"] == f"swarm:{SWARM}" and s.get("shared")]
    resonated = any(
        {"ana", "ben"} <= {w for p in s["proposals"] if p["entered"] for w in p["contributors"]}
        for s in shared_records
    )
    entries_left = [
        e for e in dl.wavegen.cache.entries() if e.swarm == SWARM and e.text == PARSER and e.tier != "agent"
    ]
    evicted = any(e[2].startswith("evicted") and e[1] == "cache" for e in events)
    checks = {
        "a_missed_then_hit": requests[0][2] == "miss" and any(c != "miss" for t, a, c in requests if a == "ana"),
        "a_screened": any(e[1] == "ana" and e[2] == "SCREENED" for e in events),
        "a_migrated_to_agent": any(e[1] == "ana" and e[3] == "context:ana → agent:ana" for e in events),
        "b_resonated": resonated,
        "swarm_consolidated": bool(shared_records),
        "entry_evicted": evicted,
        "inherited": {n: inherited[n] for n in ("cy", "dee", "eve")},
        "other_swarm_inherited": inherited["finn"],
        "swarm_entries_left": len(entries_left),
        "ticks": dl.tick_count - first_tick,
    }
    plot = _plot(events, requests, state_dir / "team.png")
    console.print(
        "first request, no cache: "
        + ", ".join(f"{n} {'[green]writes the parser' if ok else '[red]does not'}[/]" for n, ok in inherited.items())
        + f"\nconsensus into swarm:{SWARM}: {bool(shared_records)} (ana + ben: {resonated}); cache entry evicted "
        f"after consolidation: {evicted}; timeline plot: {plot}"
    )
    return {**checks, "plot": plot, "events": sorted(kinds)}


def _scope_of(dl: DynamicLoRA, circuit_id: str) -> str:
    try:
        return str(dl.hierarchy.find_circuit(circuit_id)[0].key)
    except KeyError:
        return ""


def _plot(events: list[tuple], requests: list[tuple], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    lanes = ["ana", "ben", "cache", "swarm"]
    colours = {"miss": "tab:red", "agent": "tab:green", "swarm": "tab:blue"}
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, (tick, agent_id, cache) in enumerate(requests):
        y = lanes.index(agent_id) - 0.15
        ax.scatter(tick, y, s=18, marker="|", color=colours.get(cache, "tab:gray"))
    for tick, lane, event, _ in events:
        if lane not in lanes:
            continue
        y = lanes.index(lane) + 0.12
        ax.scatter(tick, y, s=40, marker="D" if event in ("consensus", "absorbed") else "o", color="k")
        ax.annotate(event, (tick, y), xytext=(3, 5), textcoords="offset points", fontsize=7, rotation=25)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.2)
    ax.set_xlabel("tick")
    ax.set_title(
        "seed scenario — ticks: requests (red miss, green agent-tier hit, blue swarm-tier hit) and memory events",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
