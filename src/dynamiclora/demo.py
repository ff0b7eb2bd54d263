"""The demo: two agents of one team learn on the built-in model, a third agent of another team looks on.

``run_demo(fast=True)`` uses a tiny random model instead (for tests); the README's first command runs
the full demo on the built-in model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import DynamicLoRA
from .demo_dynamics import run_dynamics
from .demo_team import run_team
from .demo_wavegen import run_wavegen

PATTERNS = {
    "alice": ("def parse_json(text):", '\n    """Parse a JSON document."""\n    return json.loads(text)\n'),
    "bob": ("def read_config(path):", "\n    with open(path) as f:\n        return json.load(f)\n"),
}


@dataclass
class DemoReport:
    reproduced: dict[str, bool]  # agent -> greedy output equals what it learned
    untouched: bool  # an agent that learned nothing still generates what the base model does
    reload_identical: bool  # outputs after save -> load equal outputs before
    state_dir: Path
    dynamics: dict  # migrated / reproduced / forgotten / plot of the second act
    wavegen: dict  # outcome / internalized / hit_rate / speedups of the third act
    team: dict  # the seed's team scenario (fourth act): its checks, see demo_team


def _build(fast: bool, data_dir: Path | None) -> DynamicLoRA:
    if fast:
        from .testing import tiny_model

        model, tokenizer = tiny_model("llama")
        return DynamicLoRA(model, tokenizer)
    return DynamicLoRA.default(data_dir=data_dir)


def _show(text: str) -> str:
    return text.replace("\n", "⏎")


def run_demo(
    fast: bool = False,
    state_dir: str | Path = "state/demo",
    rounds: int = 3,
    data_dir: Path | None = None,
    console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    state_dir = Path(state_dir)
    console.rule("[bold]DynamicLoRA demo")
    dl = _build(fast, data_dir)
    console.print(f"{dl}\n")
    agents = {
        "alice": dl.agent("alice", swarm="backend", domain="python"),
        "bob": dl.agent("bob", swarm="backend", domain="python"),
        "carol": dl.agent("carol", swarm="frontend", domain="python"),
    }
    gen = {"max_new_tokens": 32}
    before = {name: agents["carol"].generate(prompt, **gen).text for name, (prompt, _) in PATTERNS.items()}

    table = Table(title="learning (context tier only)")
    for col in ("agent", "call", "circuit", "new?", "attribution", "loss before", "loss after"):
        table.add_column(col)
    for call in range(1, rounds + 1):
        for name, (prompt, completion) in PATTERNS.items():
            r = agents[name].learn(prompt, completion)
            table.add_row(
                name,
                str(call),
                r.circuit_id[:8],
                "yes" if r.spawned else "",
                f"{r.activation:.2f}",
                f"{r.loss_before:.3f}",
                f"{r.loss_after:.3f}",
            )
    console.print(table)

    table = Table(title="greedy generation after learning")
    for col in ("agent", "prompt", "output", "learned it?", "snapshot"):
        table.add_column(col, overflow="fold")
    outputs, reproduced = {}, {}
    for name, agent in agents.items():
        for pattern, (prompt, completion) in PATTERNS.items():
            res = agent.generate(prompt, **gen)
            outputs[(name, pattern)] = res.text
            match = res.text == completion
            if name == pattern:
                reproduced[name] = match
            table.add_row(name, prompt, _show(res.text), "yes" if match else "no", res.snapshot_hash[:10])
    console.print(table)
    untouched = all(outputs[("carol", p)] == before[p] for p in PATTERNS)

    dl.save(state_dir)
    again = DynamicLoRA.load(state_dir, model=None if not fast else _reload_model(dl), tokenizer=dl.tokenizer)
    reload_identical = all(
        again.agent(n).generate(PATTERNS[p][0], **gen).text == outputs[(n, p)] for n in agents for p in PATTERNS
    )

    table = Table(title=f"circuits (saved to {state_dir})")
    for col in ("id", "tier", "scope", "rank", "label", "usage"):
        table.add_column(col, overflow="fold")
    for rec in dl.circuits():
        table.add_row(
            rec["id"][:8], rec["tier"], rec["scope"], str(rec["rank"]), _show(rec["label"]), f"{rec['usage']:.2f}"
        )
    console.print(table)
    console.print(
        f"carol (other team, learned nothing) unchanged: {untouched}; "
        f"save → load gives identical outputs: {reload_identical}"
    )
    console.rule("[bold]memory dynamics")
    dynamics = run_dynamics(dl, state_dir, console)
    console.rule("[bold]WaveGen: the generation cache")
    wavegen = run_wavegen(dl, state_dir, console)
    console.rule("[bold]the team scenario: a pattern proves itself and the swarm inherits it")
    team = run_team(dl, state_dir, console)
    dl.save(state_dir)
    return DemoReport(reproduced, untouched, reload_identical, state_dir, dynamics, wavegen, team)


def _reload_model(dl: DynamicLoRA):
    """For the fast demo: a fresh copy of the same tiny random model (it has no directory to load from)."""
    from .testing import tiny_model

    return tiny_model("llama")[0]
