"""The demo's second act: memory dynamics over time.

Alice practises one pattern every other tick while one-off snippets come and go. The practised
pattern's circuit becomes SCREENED and, once its use has recurred across a whole detector window,
migrates from her context tier to her agent tier; the one-offs stay FREE, decay and are forgotten.
The timeline is printed and plotted.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import DynamicLoRA

PRACTISED = ("def parse_json(text):", '\n    """Parse a JSON document."""\n    return json.loads(text)\n')
ONE_OFFS = [
    ("SELECT name FROM users", " WHERE id = 1;"),
    ("class Stack:\n    def push(self, item):", "\n        self.items.append(item)\n"),
    ("import os\nimport sys\n", "\nprint(sys.argv)\n"),
    ("for i in range(10):", "\n    print(i * i)\n"),
    ("with open('data.csv') as f:", "\n    rows = list(csv.reader(f))\n"),
    ("try:\n    value = int(text)", "\nexcept ValueError:\n    value = 0\n"),
    ("@dataclass\nclass Point:", "\n    x: float\n    y: float\n"),
    ("if __name__ == '__main__':", "\n    main()\n"),
]


def run_dynamics(dl: DynamicLoRA, state_dir: Path, console: Console, ticks: int = 100) -> dict:
    alice = dl.agent("alice")
    dl.config.dynamics.tick_interval = 1  # one tick per interaction: a compressed clock for the demo
    events: list[tuple] = []
    series: dict = {}
    one_off = iter(ONE_OFFS)
    for t in range(ticks):
        item = PRACTISED if t % 2 == 0 else next(one_off, None) if t % 4 == 1 and t < 32 else None
        if item:
            alice.learn(*item)  # an interaction: the tick follows by itself
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
        table.add_row(str(tick), kind, label.replace("\n", "⏎")[:36], detail)
    console.print(table)
    plot = _plot(series, dl, state_dir / "dynamics.png")
    result = alice.generate(PRACTISED[0], max_new_tokens=32)
    migrated = [m for m in dl.migrations(agent="alice") if m["label"].startswith(" ".join(PRACTISED[0].split())[:20])]
    one_off_labels = {" ".join(p.split())[:20] for p, _ in ONE_OFFS}
    faded = [f for f in dl.forgotten() if f["scope"] == "alice" and f["label"][:20] in one_off_labels]
    console.print(
        f"practised pattern migrated to the agent tier: {bool(migrated)}; still produced: "
        f"{result.text == PRACTISED[1]}; one-offs forgotten so far: {len(faded)} of {len(ONE_OFFS)}; "
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
        "reproduced": result.text == PRACTISED[1],
        "forgotten": len(faded),
        "plot": plot,
    }


def _snapshot(dl: DynamicLoRA, series: dict, t: int) -> None:
    for c in dl.hierarchy.all_circuits():
        if c.tier in ("context", "agent"):
            series.setdefault(c.id, {"label": c.label, "points": []})["points"].append(
                (t, c.strength, c.phase, c.tier)
            )


def _plot(series: dict, dl: DynamicLoRA, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for cid, s in series.items():
        ts = [p[0] for p in s["points"]]
        strengths = [p[1] for p in s["points"]]
        (line,) = ax.plot(ts, strengths, lw=1.5, label=s["label"].replace("\n", "⏎")[:28])
        for t, strength, phase, tier in s["points"]:
            marker = "s" if tier == "agent" else "o"
            ax.scatter(
                t,
                strength,
                s=14,
                marker=marker,
                color=line.get_color(),
                edgecolors="k" if phase == "SCREENED" else "none",
                linewidths=0.8,
            )
    for m in dl.migrations():
        ax.axvline(m["tick"], color="k", ls=":", lw=0.8)
    ax.set_xlabel("tick")
    ax.set_ylabel("strength (scale / scale on entering its tier)")
    ax.set_title(
        "circuits over time — circles: context tier, squares: agent tier, black edge: SCREENED, dotted: migration",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
