"""The demo's second act: memory dynamics over time.

Alice keeps asking what she learned in the first act (the staging port) every other tick, while one-off facts
are learned once and never asked for again. The asked-for circuit becomes SCREENED and, once its use has recurred
across a whole detector window, migrates from her context tier to her agent tier; the one-offs stay FREE, decay
and are forgotten. The timeline is printed and plotted.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import DynamicLoRA
from .demo_common import ask, one_line

ONE_OFFS = [
    ("Where is today's stand-up?", "Today's stand-up is in room Juniper at 9:30."),
    ("Who is on call this week?", "Priya is on call this week; page her through the ops channel."),
    ("What is the Wi-Fi password for the guest network?", "The guest network password this month is orchid-42."),
    ("Which ticket is the login bug?", "The login bug is ticket API-311."),
    ("When is the next release freeze?", "The next release freeze starts on Thursday at noon."),
    ("What did the customer from Lyon ask for?", "The customer from Lyon asked for invoices in PDF."),
]


def run_dynamics(
    dl: DynamicLoRA,
    state_dir: Path,
    console: Console,
    practised: tuple[str, str],
    max_new_tokens: int,
    ticks: int = 100,
) -> dict:
    """``practised``: (question, answer) alice learned before and now keeps asking."""
    alice = dl.agent("alice")
    dl.config.dynamics.tick_interval = 1  # one tick per interaction: a compressed clock for the demo
    events: list[tuple] = []
    series: dict = {}
    one_off = iter(ONE_OFFS)
    for t in range(ticks):
        if t % 2 == 0:
            alice.chat(ask(practised[0]), max_new_tokens=max_new_tokens)  # an interaction: the tick follows by itself
        elif t % 4 == 1 and (item := next(one_off, None)):
            alice.learn(messages=ask(item[0]), completion=item[1])
        else:
            dl.tick()  # an idle tick
        _snapshot(dl, series, t)
    for r in dl.migrations(agent="alice"):
        events.append((r["tick"], "migrated", r["label"], f"{r['from']} → {r['to']} (stability {r['score']})"))
    for r in dl.forgotten():
        events.append((r["tick"], "forgotten", r["label"], f"from {r['tier']}:{r['scope']}"))
    for c in dl.hierarchy.all_circuits():
        for h in c.history:
            if h["event"] == "phase":
                events.append((h["tick"], f"{h['from']} → {h['to']}", c.label, f"u = {h['u']}"))
    table = Table(title="memory dynamics: alice practises one pattern among one-offs (1 tick per interaction)")
    for col in ("tick", "event", "circuit", "detail"):
        table.add_column(col, overflow="fold")
    for tick, kind, label, detail in sorted(events, key=lambda e: (e[0], e[1])):
        table.add_row(str(tick), kind, one_line(label)[:36], detail)
    console.print(table)
    plot = _plot(series, dl, state_dir / "dynamics.png")
    result = alice.chat(ask(practised[0]), max_new_tokens=max_new_tokens, use_cache=False)
    migrated = [m for m in dl.migrations(agent="alice") if m["label"].startswith(" ".join(practised[0].split())[:20])]
    one_off_labels = {" ".join(p.split())[:20] for p, _ in ONE_OFFS}
    faded = [f for f in dl.forgotten() if f["scope"] == "alice" and f["label"][:20] in one_off_labels]
    console.print(
        f"practised pattern migrated to the agent tier: {bool(migrated)}; still produced: "
        f"{result.text == practised[1]}; one-offs forgotten so far: {len(faded)} of {len(ONE_OFFS)}; "
        f"timeline plot: {plot}"
    )
    scales = dl.timescales()
    console.print(
        "measured time scales (mean ticks in tier): "
        + ", ".join(
            f"{tier} {'≥ ' if v['lower_bound'] else ''}{v['ticks']:.0f}"
            for tier, v in scales.items()
            if v["ticks"] is not None
        )
    )
    return {
        "migrated": bool(migrated),
        "reproduced": result.text == practised[1],
        "forgotten": len(faded),
        "plot": plot,
    }


def _snapshot(dl: DynamicLoRA, series: dict, t: int) -> None:
    for c in dl.hierarchy.all_circuits():
        if c.tier in ("context", "agent"):
            series.setdefault(c.id, {"label": c.label, "points": []})["points"].append((t, c.vigor, c.phase, c.tier))


def _plot(series: dict, dl: DynamicLoRA, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for cid, s in series.items():
        ts = [p[0] for p in s["points"]]
        vigors = [p[1] for p in s["points"]]
        (line,) = ax.plot(ts, vigors, lw=1.5, label=one_line(s["label"])[:28])
        for t, vigor, phase, tier in s["points"]:
            marker = "s" if tier == "agent" else "o"
            ax.scatter(
                t,
                vigor,
                s=14,
                marker=marker,
                color=line.get_color(),
                edgecolors="k" if phase == "SCREENED" else "none",
                linewidths=0.8,
            )
    for m in dl.migrations():
        ax.axvline(m["tick"], color="k", ls=":", lw=0.8)
    ax.set_xlabel("tick")
    ax.set_ylabel("vigor (disuse fades it; forgotten below the floor)")
    ax.set_title(
        "circuits over time — circles: context tier, squares: agent tier, black edge: SCREENED, dotted: migration",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
