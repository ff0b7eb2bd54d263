"""The demo: two agents of one team learn on the default model (SmolLM2-135M-Instruct), a third agent of
another team looks on. Every request is a chat message through the model's chat template.

``run_demo(fast=True)`` uses a tiny random model with a minimal chat template instead (for tests); the README's
first command runs the full demo on the default model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import DynamicLoRA
from .demo_common import ask, one_line
from .demo_dynamics import run_dynamics
from .demo_team import run_team
from .demo_wavegen import run_wavegen

#: What each agent of team ``backend`` is taught: a question about its team and the answer the team gave.
PATTERNS = {
    "alice": ("Which port does our staging API listen on?", "Our staging API listens on port 8443, behind the VPN."),
    "bob": ("How do we name release branches?", "Release branches are named release/YYYY.MM, like release/2026.12."),
}


@dataclass
class DemoReport:
    reproduced: dict[str, bool]  # agent -> greedy reply equals what it learned
    untouched: bool  # an agent that learned nothing still replies what the base model does
    reload_identical: bool  # replies after save -> load equal replies before
    state_dir: Path
    dynamics: dict  # migrated / reproduced / forgotten / plot of the second act
    wavegen: dict  # outcome / internalized / hit_rate / speedups of the third act
    team: dict  # the seed's team scenario (fourth act): its checks, see demo_team
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each act


def demo_model(fast: bool = False, data_dir: Path | None = None) -> DynamicLoRA:
    """The demo's model: the default one, or with ``fast`` a tiny random one that learns the demo's texts in a
    few calls."""
    if fast:
        from .config import DynamicLoRAConfig

        # a random 2-layer model takes bigger steps than a pretrained 30-layer one to learn in a few calls
        return DynamicLoRA(*_fast_model(), DynamicLoRAConfig(learning={"learning_rate": 1e-2}))
    return DynamicLoRA.default(data_dir=data_dir)


def _fast_model():
    """(model, tokenizer) of the fast demo: a tiny random Llama wide enough to learn the demo's answers."""
    from .testing import tiny_chat_model

    return tiny_chat_model("llama", hidden=128)


def run_demo(
    fast: bool = False,
    state_dir: str | Path = "state/demo",
    rounds: int = 3,
    data_dir: Path | None = None,
    console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    state_dir = Path(state_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    console.rule("[bold]DynamicLoRA demo")
    dl = demo_model(fast, data_dir)
    console.print(f"{dl}\n")
    seconds["load"] = time.perf_counter() - t0
    agents = {
        "alice": dl.agent("alice", swarm="backend", domain="python"),
        "bob": dl.agent("bob", swarm="backend", domain="python"),
        "carol": dl.agent("carol", swarm="frontend", domain="python"),
    }
    gen = {"max_new_tokens": max(len(dl.encode(a, special=False)) for _, a in PATTERNS.values()) + 4}
    before = {name: agents["carol"].chat(ask(q), **gen).text for name, (q, _) in PATTERNS.items()}

    table = Table(title="learning from a conversation (context tier only)")
    for col in ("agent", "call", "circuit", "new?", "attribution", "loss before", "loss after"):
        table.add_column(col)
    for name, (question, answer) in PATTERNS.items():
        for call in range(1, rounds + 1):  # until the agent gives the answer itself (one or two calls, usually)
            r = agents[name].learn(messages=ask(question), completion=answer)
            table.add_row(
                name,
                str(call),
                r.circuit_id[:8],
                "yes" if r.spawned else "",
                f"{r.activation:.2f}",
                f"{r.loss_before:.3f}",
                f"{r.loss_after:.3f}",
            )
            if agents[name].chat(ask(question), **gen, use_cache=False).text == answer:
                break
    console.print(table)

    table = Table(title="greedy replies after learning")
    for col in ("agent", "question", "reply", "learned it?", "snapshot"):
        table.add_column(col, overflow="fold")
    outputs, reproduced = {}, {}
    for name, agent in agents.items():
        for pattern, (question, answer) in PATTERNS.items():
            res = agent.chat(ask(question), **gen)
            outputs[(name, pattern)] = res.text
            match = res.text == answer
            if name == pattern:
                reproduced[name] = match
            table.add_row(name, question, one_line(res.text), "yes" if match else "no", res.snapshot_hash[:10])
    console.print(table)
    untouched = all(outputs[("carol", p)] == before[p] for p in PATTERNS)

    dl.save(state_dir)
    again = DynamicLoRA.load(state_dir, model=None if not fast else _reload_model(dl), tokenizer=dl.tokenizer)
    reload_identical = all(
        again.agent(n).chat(ask(PATTERNS[p][0]), **gen).text == outputs[(n, p)] for n in agents for p in PATTERNS
    )
    del again

    table = Table(title=f"circuits (saved to {state_dir})")
    for col in ("id", "tier", "scope", "rank", "label", "usage"):
        table.add_column(col, overflow="fold")
    for rec in dl.circuits():
        table.add_row(
            rec["id"][:8], rec["tier"], rec["scope"], str(rec["rank"]), one_line(rec["label"]), f"{rec['usage']:.2f}"
        )
    console.print(table)
    console.print(
        f"carol (other team, learned nothing) unchanged: {untouched}; "
        f"save → load gives identical replies: {reload_identical}"
    )
    seconds["learning"] = time.perf_counter() - t0 - seconds["load"]
    acts = {
        "dynamics": (
            "memory dynamics",
            lambda: run_dynamics(dl, state_dir, console, PATTERNS["alice"], gen["max_new_tokens"]),
        ),
        "wavegen": ("WaveGen: the generation cache", lambda: run_wavegen(dl, state_dir, console)),
        "team": (
            "the team scenario: a pattern proves itself and the swarm inherits it",
            lambda: run_team(dl, state_dir, console),
        ),
    }
    results = {}
    for key, (title, act) in acts.items():
        console.rule(f"[bold]{title}")
        t = time.perf_counter()
        results[key] = act()
        seconds[key] = time.perf_counter() - t
    dl.save(state_dir)
    seconds["total"] = time.perf_counter() - t0
    console.print("seconds per act: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return DemoReport(
        reproduced,
        untouched,
        reload_identical,
        state_dir,
        results["dynamics"],
        results["wavegen"],
        results["team"],
        seconds,
    )


def _reload_model(dl: DynamicLoRA):
    """For the fast demo: a fresh copy of the same tiny random model (it has no directory to load from)."""
    return _fast_model()[0]
