"""The ``dynamiclora`` command: a thin layer over the library, one function per subcommand."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import DynamicLoRAError
from .packaged import DEFAULT_MODEL


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo on the default model (SmolLM2-135M-Instruct): agents learn from chat, their memory moves between
    tiers, WaveGen serves and internalizes, a team shares what proved itself; prints what happened."""
    from .demo import run_demo

    report = run_demo(
        fast=args.fast,
        state_dir=args.state_dir,
        rounds=args.rounds,
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )
    ok = all(report.reproduced.values()) and report.untouched and report.reload_identical
    ok = ok and report.dynamics["migrated"] and report.wavegen["internalized"]
    ok = ok and all(report.team["inherited"].values()) and not report.team["other_swarm_inherited"]
    return 0 if ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """Agents, scopes and circuits of a saved state, read straight from its SQLite records."""
    from .store import DB_NAME

    db = Path(args.state_dir) / DB_NAME
    if not db.exists():
        raise DynamicLoRAError(f"{db} does not exist: {args.state_dir} is not a saved state (see dl.save)")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        meta = dict(con.execute("SELECT key, value FROM meta"))
        agents = con.execute("SELECT id, swarm, domain FROM agents ORDER BY id").fetchall()
        scopes = con.execute("SELECT tier, name, circuits, content_hash FROM scopes").fetchall()
        circuits = [json.loads(r) for (r,) in con.execute("SELECT record FROM circuits")]
        logs = {
            t: [json.loads(r) for (r,) in con.execute(f"SELECT record FROM {t} ORDER BY seq")]
            for t in ("migrations", "forgotten", "cache_log")
        }
        cache = [json.loads(r) for (r,) in con.execute("SELECT record FROM cache_entries")]
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and pipes: do not fold tables
    console.print(
        f"base model {meta.get('base_model')!r}  ticks {meta.get('tick_count')}  "
        f"interactions {meta.get('interactions')}"
    )
    t = Table(title="agents")
    for col in ("id", "swarm", "domain"):
        t.add_column(col)
    for row in agents:
        t.add_row(*row)
    console.print(t)
    t = Table(title="scopes")
    for col in ("tier", "name", "circuits", "content hash"):
        t.add_column(col)
    order = ("foundation", "domain", "swarm", "agent", "context")
    for tier, name, n, digest in sorted(scopes, key=lambda s: (order.index(s[0]), s[1])):
        t.add_row(tier, name, str(n), digest[:16])
    console.print(t)
    t = Table(title="circuits")
    for col in ("id", "tier", "scope", "rank", "gated", "phase", "u", "strength", "label", "origin", "updated"):
        t.add_column(col, overflow="fold")
    t.add_column("neurons", overflow="fold")
    for c in sorted(circuits, key=lambda c: (order.index(c["tier"]), c["scope"], c["created_tick"], c["id"])):
        t.add_row(
            c["id"][:8],
            c["tier"],
            c["scope"],
            str(c["rank"]),
            "yes" if c.get("gated") else "",  # acts only on the prompts it learned from (routing)
            c.get("phase", ""),
            f"{c.get('u', 0):.2f}",
            f"{c.get('strength', 1):.2f}",
            c["label"].replace("\n", "⏎"),
            ",".join(c["origin_agents"]),
            str(c["updated_tick"]),
            str(c.get("extracted", {}).get("neurons", "")),  # size of its extracted circuit (WaveGen)
        )
    console.print(t)
    if logs["migrations"]:
        t = Table(title="migrations")
        for col in ("tick", "circuit", "from", "to", "stability", "label"):
            t.add_column(col, overflow="fold")
        for m in logs["migrations"]:
            t.add_row(
                str(m["tick"]), m["circuit"][:8], m["from"], m["to"], str(m["score"]), m["label"].replace("\n", "⏎")
            )
        console.print(t)
    if logs["forgotten"]:
        t = Table(title="forgotten")
        for col in ("tick", "circuit", "tier", "scope", "label"):
            t.add_column(col, overflow="fold")
        for f in logs["forgotten"]:
            t.add_row(str(f["tick"]), f["circuit"][:8], f["tier"], f["scope"], f["label"].replace("\n", "⏎"))
        console.print(t)
    _print_cache(console, json.loads(meta.get("wavegen", "{}")), cache, logs["cache_log"])
    return 0


def _print_cache(console: Console, state: dict, entries: list[dict], log: list[dict]) -> None:
    """WaveGen: per-tier statistics, the hottest entries, and the consolidation log."""
    lookups = state.get("lookups", 0)
    drafted = state.get("drafted", 0)
    console.print(
        f"WaveGen cache: {len(entries)} entries, {lookups} lookups, "
        f"draft acceptance {state.get('accepted', 0) / drafted if drafted else 0:.2f}"
    )
    t = Table(title="cache tiers")
    for col in (
        "tier",
        "entries",
        "hits",
        "semantic hits",
        "hit rate",
        "stores",
        "evicted",
        "invalidated",
        "consolidated",
    ):
        t.add_column(col)
    for tier, stats in state.get("stats", {}).items():
        hits = stats["hits"] + stats["semantic_hits"]
        t.add_row(
            tier,
            str(sum(e["tier"] == tier for e in entries)),
            str(stats["hits"]),
            str(stats["semantic_hits"]),
            f"{hits / lookups if lookups else 0:.2f}",
            str(stats["stores"]),
            str(stats["evicted"]),
            str(stats["invalidated"]),
            str(stats["consolidated"]),
        )
    console.print(t)
    if entries:
        t = Table(title="hottest cache entries")
        for col in ("tier", "agent", "hits/lookups", "accepted/drafted", "coherence", "continuation"):
            t.add_column(col, overflow="fold")
        for e in sorted(entries, key=lambda e: (-e["hits"], -e["lookups"]))[:10]:
            t.add_row(
                e["tier"],
                e["agent"],
                f"{e['hits']}/{e['lookups']}",
                f"{e['accepted']}/{e['drafted']}",
                f"{e['coherence']:.2f}",
                e["text"][:50].replace("\n", "⏎"),
            )
        console.print(t)
    if log:
        t = Table(title="cache consolidations")
        for col in ("tick", "tier", "scope", "outcome", "hit rate", "steps", "reason / continuation"):
            t.add_column(col, overflow="fold")
        for r in log:
            t.add_row(
                str(r["tick"]),
                r["tier"],
                r.get("scope", "-"),
                r["outcome"],
                f"{r['hit_rate']:.2f}",
                str(r.get("steps", "")),
                r.get("reason", r["text"]).replace("\n", "⏎"),
            )
        console.print(t)


def cmd_export_peft(args: argparse.Namespace) -> int:
    """Write a scope or an agent's whole stack of a saved state as a PEFT LoRA adapter directory."""
    from .core import DynamicLoRA

    dl = DynamicLoRA.load(args.state_dir)
    out = dl.export_peft(args.out, scope=args.scope, agent=args.agent, gated=args.gated)
    Console().print(f"wrote PEFT adapter to {out}")
    return 0


# benchmark name -> its module under dynamiclora.bench (imported when run)
BENCHMARKS = {
    "forward": "forward",
    "dynamics": "dynamics",
    "wavegen": "wavegen",
    "swarm": "swarm",
    "server": "server",
    "continual": "continual",
    "persistence": "persistence",
    "editing": "editing",
    "fact-forward": "fact_forward",
    "reach": "reach",
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark and write JSON + markdown (+ plots) under the output directory."""
    bench = importlib.import_module(f".bench.{BENCHMARKS[args.name]}", __package__)
    own = ["--out", args.out, "--model", args.model] + (["--quick"] if args.quick else [])
    bench.main(own + list(getattr(args, "options", [])))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an OpenAI-compatible API (per-agent keys, batching, dashboard at /) over a saved state."""
    import uvicorn

    from .server import create_app, open_state
    from .server.keys import ADMIN_FILE

    state_dir = Path(args.state_dir)
    dl = open_state(state_dir, args.model)
    app = create_app(
        dl,
        state_dir,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batching=args.batching,
        use_cache=not args.no_cache,
        learn_exchanges=args.learn_exchanges,
    )
    where = "$DYNAMICLORA_ADMIN_KEY" if os.environ.get("DYNAMICLORA_ADMIN_KEY") else state_dir / ADMIN_FILE
    Console(stderr=True).print(
        f"serving {state_dir} on http://{args.host}:{args.port}  (admin key: {where}; dashboard: /?key=<admin key>)"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamiclora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--fast", action="store_true", help="use a tiny random model instead of the default one")
    p.add_argument("--state-dir", default="state/demo", help="where the demo saves its state")
    p.add_argument("--rounds", type=int, default=3, help="learn() calls per pattern at most (until it is answered)")
    p.add_argument("--data-dir", default=None, help="where the default model is prepared ($DYNAMICLORA_HOME)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("state_dir")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export-peft", help=cmd_export_peft.__doc__)
    p.add_argument("state_dir")
    p.add_argument("out")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--scope", help="one scope: 'foundation', 'domain:NAME', 'swarm:NAME', 'agent:ID', 'context:ID'"
    )
    group.add_argument("--agent", help="an agent id: export its whole stack")
    p.add_argument(
        "--gated",
        choices=["include", "exclude"],
        default="include",
        help="gated circuits (a PEFT adapter cannot route): write them as always acting (include, warns) or leave "
        "them out (exclude); dynamiclora_export.json lists what was kept and lost",
    )
    p.set_defaults(func=cmd_export_peft)
    p = sub.add_parser("bench", help=cmd_bench.__doc__)
    p.add_argument(
        "name",
        choices=list(BENCHMARKS),
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="tiny model only, few repeats")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="smollm2 (the default model), stdlib (4.3M), or a directory / hub id"
    )
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--state-dir", default="state/server", help="saved state to serve (created if missing)")
    p.add_argument("--model", default=None, help="a Transformers model for a new state (default: the default model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429")
    p.add_argument("--max-batch", type=int, default=16, help="rows of the running batch (generation requests)")
    p.add_argument(
        "--batching",
        choices=("continuous", "static", "off"),
        default="continuous",
        help="continuous: requests join the running decode between steps (default); static: requests waiting "
        "together run as one batch to its end; off: one request at a time",
    )
    p.add_argument("--no-cache", action="store_true", help="serve nothing through WaveGen")
    p.add_argument(
        "--learn-exchanges",
        action="store_true",
        help="learn every reply an agent finishes by itself into its context tier (saved before the answer)",
    )
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.func is not cmd_bench:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.options = extra  # a benchmark's own options (bench editing --steps 1,10, bench continual --gates)
    try:
        return args.func(args)
    except (DynamicLoRAError, FileNotFoundError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
