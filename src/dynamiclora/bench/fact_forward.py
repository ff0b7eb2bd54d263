"""A request's forward, and one learn call, with a memory of N fact circuits, against the base model.

The memory is built without training: each of the editing data's first N facts gets the gate the learner would give
it (``reach.teach``, both ways, strict gates) on a rank-1 circuit over the value projections from the route layer on
(``facts-late``'s gates and modules: routed inside the forward) with random factors. ``facts-late``'s learning
options (subject locality, keys off the background) are left out: they change what a learn step costs, not a
forward, so the learn call timed here is a plain fact circuit's. A forward's cost depends on which
circuits a prompt reaches and on their shapes, not on the trained values, so this measures at N = 1,000 in minutes
what the editing benchmark measures after hours of edits.

Timed round-robin against the base model (medians of ``--repeats`` rounds over each prompt set):

- *taught*: the last 16 taught prompts (each reaches its own circuit); *reworded*, *chat*: their paraphrases;
  *general*: the editing benchmark's general prompts (no circuit reached);
- *remembered*: route features already known (as while a request decodes), *new request*: routed afresh.

Also recorded: the share of new requests routed inside their forward (the rest fell back to the route pre-pass),
plans built per forward, and the median time of one ``learn`` call for the next facts (attribution over N gates,
the plan, the steps).

Run: ``python benchmarks/fact_forward.py`` (SmolLM2, N = 10, 100, 1,000, about six minutes; ``--quick``: a tiny
model, N = 10, 60).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..circuits import Circuit
from ..continual.methods import FACT_CIRCUITS, DynamicLoRAMethod
from .editing import chat_prompt
from .editing_data import GENERAL, GENERAL_CHAT, facts
from .reach import teach
from .record import arguments, fresh_models, model_suffix, selected_model, write

PROMPTS = 16  # prompts per set
LEARN_CALLS = 4  # learn calls timed per N (the facts after the N-th)
AGENT = "editor"
KINDS = ("taught", "reworded", "chat", "general")


class _Counter:
    """Counts the calls of one bound method of an object (replaced on the instance, restored by ``undo``)."""

    def __init__(self, obj, name: str) -> None:
        self.obj, self.name, self.calls = obj, name, 0
        inner = getattr(obj, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        setattr(obj, name, counted)

    def undo(self) -> None:
        delattr(self.obj, self.name)


def fact_memory(method: DynamicLoRAMethod, prompts: list[list[int]], answers: list[str], seed: int = 0) -> int:
    """Give the agent one random rank-1 circuit per taught prompt, gated as the learner gates it; returns how
    many circuits (prompts of the same answer that reach one gate share it)."""
    rt = method.dl.runtime
    router = rt.router
    circuits, _, _ = teach(router, router.features(prompts), prompts, answers, "look-alike, both ways")
    scope = method.dl.hierarchy.agent(AGENT).stack()[-1]
    g = torch.Generator().manual_seed(seed)
    for c in circuits:
        factors = {}
        for name in rt.circuit_modules:
            layer = rt.layers[name]
            a = torch.randn(1, layer.in_features, generator=g) / layer.in_features**0.5
            b = torch.randn(layer.out_features, 1, generator=g) * 0.01
            factors[name] = (a, b)
        rt.place(scope, Circuit(factors, tier=scope.tier, scope=scope.name, gate=c.gate))
    return len(circuits)


@torch.no_grad()
def time_forwards(method, base, sets: dict[str, list[list[int]]], repeats: int, new_request: bool) -> dict:
    """Per prompt set: the median forward time over the base model's, round-robin."""
    dl, router = method.dl, method.dl.runtime.router
    agent = dl.agent(AGENT)
    out = {}
    for kind, prompts in sets.items():
        mine, theirs = [], []
        for ids in prompts[:2]:  # warm-up
            agent.logits(torch.tensor([ids]), route_tokens=len(ids))
            base(input_ids=torch.tensor([ids]))
        prepass = _Counter(dl.runtime, "route")
        builds = _Counter(dl.runtime.planner, "_build")
        for _ in range(repeats):
            for ids in prompts:
                x = torch.tensor([ids])
                if new_request:
                    router.forget_features()
                t0 = time.perf_counter()
                agent.logits(x, route_tokens=len(ids))
                t1 = time.perf_counter()
                base(input_ids=x)
                mine.append(t1 - t0)
                theirs.append(time.perf_counter() - t1)
        prepass.undo()
        builds.undo()
        n = len(mine)
        out[kind] = {
            "ratio": statistics.median(mine) / statistics.median(theirs),
            "median_ms": 1e3 * statistics.median(mine),
            "base_median_ms": 1e3 * statistics.median(theirs),
            "routed_inline": 1 - prepass.calls / n,
            "plans_built_per_forward": builds.calls / n,
        }
    return out


def time_learn(method, prompts: list[str], targets: list[str]) -> float:
    agent = method.dl.agent(AGENT)
    times = []
    for p, t in zip(prompts, targets):
        t0 = time.perf_counter()
        agent.learn(p, t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(fresh, base, tokenizer, sizes: list[int], repeats: int) -> list[dict]:
    data = facts(max(sizes) + LEARN_CALLS)
    encode = lambda text: list(tokenizer(text)["input_ids"])  # noqa: E731
    rows = []
    for n in sizes:
        method = DynamicLoRAMethod(
            fresh(), tokenizer, [AGENT], capacity=n + LEARN_CALLS, route_strict=True, circuits_after_route=True,
            **FACT_CIRCUITS,
        )  # fmt: skip
        t0 = time.perf_counter()
        circuits = fact_memory(method, [encode(f.prompt) for f in data[:n]], [f.target for f in data[:n]])
        built_s = time.perf_counter() - t0
        recent = data[max(0, n - PROMPTS) : n]
        sets = {
            "taught": [encode(f.prompt) for f in recent],
            "reworded": [encode(f.paraphrases["reworded"]) for f in recent],
            "chat": [chat_prompt(tokenizer, f.paraphrases["chat"]) for f in recent],
            "general": [encode(p) for p in GENERAL] + [chat_prompt(tokenizer, q) for q in GENERAL_CHAT],
        }
        sets["general"] = sets["general"][:PROMPTS]
        row = {
            "facts": n,
            "circuits": circuits,
            "memory_built_s": built_s,
            "remembered": time_forwards(method, base, sets, repeats, new_request=False),
            "new_request": time_forwards(method, base, sets, repeats, new_request=True),
        }
        following = data[n : n + LEARN_CALLS]
        row["learn_call_s"] = time_learn(method, [f.prompt for f in following], [f.target for f in following])
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _row_line(row: dict) -> str:
    cells = " | ".join(f"{row['remembered'][k]['ratio']:.3f}× / {row['new_request'][k]['ratio']:.3f}×" for k in KINDS)
    inline = statistics.mean(row["new_request"][k]["routed_inline"] for k in KINDS)
    return f"| {row['facts']:,} | {row['circuits']:,} | {cells} | {inline:.2f} | {row['learn_call_s']:.2f} |"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# A request's forward with N fact circuits (cpu)",
        "",
        "Forward time over the base model's, median; each cell: route features remembered (decoding) / a new "
        "request (routed afresh). Target: at most 1.10× at 1,000 facts.",
        "",
        "| facts | circuits | " + " | ".join(KINDS) + " | new requests routed inline | learn call s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row_line(r) for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, mode, title in zip(axes, ("remembered", "new_request"), ("route features remembered", "a new request")):
        for kind in KINDS:
            ax.plot([r["facts"] for r in rows], [r[mode][kind]["ratio"] for r in rows], marker="o", label=kind)
        ax.axhline(1.10, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("fact circuits in the memory")
        ax.set_title(title)
    axes[0].set_ylabel("forward / base model")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--sizes", help="memory sizes, e.g. 10,100,1000")
        parser.add_argument("--repeats", type=int, default=3, help="rounds over each prompt set")

    args = arguments(__doc__, argv, extra=extra)
    fresh, tokenizer = fresh_models(args.quick)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [10, 60] if args.quick else [10, 100, 1000]
    t0 = time.perf_counter()
    rows = measure(fresh, fresh(), tokenizer, sizes, args.repeats)
    record = {"model": selected_model(), "sizes": sizes, "repeats": args.repeats, "rows": rows,
              "wall_s": time.perf_counter() - t0}  # fmt: skip
    name = "fact-forward-cpu" + ("-quick" if args.quick else model_suffix())
    md = markdown(rows)
    write(Path(args.out), name, record, md)
    plot(rows, Path(args.out) / f"{name}.png")
    print(md)
    return record
