"""Continual learning against real baselines (DESIGN 10): task streams, the accuracy matrix and its GEM metrics,
held-out perplexity of standard-library source, wall time and trainable parameters.

Run: ``python benchmarks/continual.py`` (the default model: the facts stream at its learning rate, about 25
minutes on 2 cores; ``--model stdlib``: every stream at three rates, minutes; ``--quick``: a tiny random model).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from ..continual import streams
from ..continual.methods import (
    FACT_CIRCUITS,
    FACTS_LATE,
    DynamicLoRAMethod,
    FastSlowEMA,
    Method,
    MultiTaskLoRA,
    OrthogonalLoRA,
    Replay,
    SequentialLoRA,
    encode,
    perplexity,
)
from ..continual.metrics import summarize
from .record import arguments, model_path, model_suffix, selected_model, write

CHUNK, CHUNKS = 128, 12  # held-out perplexity: this many chunks of this many tokens
# Every method runs at every learning rate of the grid; the targets compare each method at its best one (highest
# ACC). 1e-2 is DynamicLoRA's default; without routing it, like every PEFT learner, wrecks the model on this
# stream at 1e-2 (held-out perplexity 60 → 4,500-17,000).
LEARNING_RATES = (1e-2, 3e-3, 1e-3)


def held_out_chunks(tokenizer, quick: bool) -> list[torch.Tensor]:
    """Standard-library source the built-in model never trained on, cut into equal chunks."""
    from ..stdlib_model import held_out_texts

    texts = held_out_texts()
    out: list[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids) - CHUNK, CHUNK * 8):
            out.append(torch.tensor([ids[start : start + CHUNK]]))
            if len(out) == (4 if quick else CHUNKS):
                return out
    return out


def run(stream: streams.Stream, method: Method, tokenizer, chunks: list[torch.Tensor], seed: int = 0) -> dict:
    """Learn the stream task by task (rounds of the task's items, shuffled per round); evaluate every task after
    each task (the accuracy matrix) and task 1 after every round."""
    rng = random.Random(seed)
    tasks = [[encode(tokenizer, p, c) for p, c in t.items] for t in stream.tasks]
    recurring = [encode(tokenizer, p, c) for p, c in stream.recurring]
    owners = [t.agent for t in stream.tasks]
    R, task1, learn_s, interactions = [], [], 0.0, 0
    for task, owner in zip(tasks, owners):
        for _ in range(stream.rounds):
            order = [(owner, e) for e in task] + [(owners[0], e) for e in recurring]
            rng.shuffle(order)
            t0 = time.perf_counter()
            for agent, example in order:
                method.learn(agent, example)
            learn_s += time.perf_counter() - t0
            interactions += len(order)
            task1.append(method.accuracy(owners[0], tasks[0]))
        method.end_task(task)
        R.append([method.accuracy(o, t) for o, t in zip(owners, tasks)])
    out = {
        "method": method.name,
        "R": R,
        **summarize(R),
        "task1_over_rounds": task1,
        "learn_s": learn_s,
        "interactions": interactions,
        "trainable_parameters": method.trainable_parameters(),
        "perplexity": method.perplexity(owners[0], chunks),
    }
    if recurring:
        out["recurring_retained"] = method.accuracy(owners[0], recurring)
        out["one_offs_retained"] = out["acc"]
    out.update(rewritten(stream, method, tokenizer, owners[0]))
    return out


def rewritten(stream: streams.Stream, method: Method, tokenizer, agent: str) -> dict:
    """Accuracy at the end on the stream's rewritten prompts (the same requests, asked differently), if any: the
    taught completion exactly (``variants``), and its text with white space aside (``variants_text``: a body on
    a line of its own, ``"\n    return 'pylon'"``, gives the taught ``" return 'pylon'"``)."""
    if not stream.variants:
        return {}
    items = [item for t in stream.tasks for item in t.items]
    asked = {name: [encode(tokenizer, rewrite(p), c) for p, c in items] for name, rewrite in stream.variants.items()}
    return {
        "variants": {name: method.accuracy(agent, examples) for name, examples in asked.items()},
        "variants_text": {name: text_accuracy(method, agent, tokenizer, examples) for name, examples in asked.items()},
    }


TEXT_SLACK = 6  # tokens a greedy answer may spend on white space (a new line, an indent) before the taught text


def text_accuracy(method: Method, agent: str, tokenizer, examples: list[tuple[list[int], list[int]]]) -> float:
    """The fraction of ``examples`` whose greedy answer begins with the completion's text, white space aside, and
    where the text ends a word."""
    eos = tokenizer.eos_token_id
    words = lambda ids: " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())  # noqa: E731
    hits = 0
    for p, c in examples:
        answer, taught = words(method.greedy(agent, p, len(c) + TEXT_SLACK, eos)), words(c)
        hits += answer == taught or answer.startswith(taught + " ")  # (the whole of it: not 'pylon' in 'pylons')
    return hits / len(examples) if examples else 0.0


def multitask(stream: streams.Stream, method: MultiTaskLoRA, tokenizer, chunks) -> dict:
    """The upper bound: one LoRA given every task's examples at once, as many steps as the stream's learners take
    (one per interaction and step of the budget), each on a batch drawn from all of them."""
    tasks = [[encode(tokenizer, p, c) for p, c in t.items] for t in stream.tasks]
    recurring = [encode(tokenizer, p, c) for p, c in stream.recurring]
    pool = [e for t in tasks for e in t] + recurring
    interactions = (sum(len(t) for t in tasks) + len(recurring) * len(tasks)) * stream.rounds
    t0 = time.perf_counter()
    method.fit(pool, interactions * method.steps)
    learn_s = time.perf_counter() - t0
    final = [method.accuracy("learner", t) for t in tasks]
    out = {"method": method.name, "R": [final], "acc": sum(final) / len(final), "learn_s": learn_s,
           "interactions": interactions, "trainable_parameters": method.trainable_parameters(),
           "perplexity": method.perplexity("learner", chunks)}  # fmt: skip
    if recurring:
        out["recurring_retained"] = method.accuracy("learner", recurring)
    out.update(rewritten(stream, method, tokenizer, "learner"))
    return out


def base_perplexity(model, chunks) -> float:
    return perplexity(lambda ids: model(input_ids=ids).logits, chunks)


def model_and_tokenizer(quick: bool):
    if quick:
        from ..testing import tiny_model

        return tiny_model("llama")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def fresh(quick: bool):
    model, tok = model_and_tokenizer(quick)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def compare(
    stream: streams.Stream, quick: bool, lr: float, ticks: tuple[int, ...] = (), radii: tuple[float, ...] = ()
) -> dict:
    """Every learner on one stream at one learning rate. DynamicLoRA runs at its default tick interval (100
    interactions: the stream fits in one) with routing and without, once per interval in ``ticks`` (the memory
    dynamics at work within the stream) and once per route radius in ``radii`` (separation against reach)."""
    model, tok = fresh(quick)
    chunks = held_out_chunks(tok, quick)
    agents = sorted({t.agent for t in stream.tasks})
    results = []
    settings = [
        (100, True, None),  # None: the configured default radius
        (100, False, None),
        *((t, True, None) for t in ticks),
        *((100, True, r) for r in radii),
    ]
    for interval, routing, radius in settings:
        learner = DynamicLoRAMethod(fresh(quick)[0], tok, agents, interval, lr=lr, routing=routing, radius=radius)
        results.append(run(stream, learner, tok, chunks))
    for cls in (SequentialLoRA, Replay, OrthogonalLoRA, FastSlowEMA):
        results.append(run(stream, cls(model, tok, lr=lr), tok, chunks))
    results.append(multitask(stream, MultiTaskLoRA(model, tok, lr=lr), tok, chunks))
    return {"stream": stream.name, "lr": lr, "base_perplexity": base_perplexity(model, chunks), "results": results}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(3.0 * (len(results) + 1), 3.2))
    for ax, r in zip(axes, results):
        ax.imshow(r["R"], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(r["method"] + (f" (lr {r['lr']:g})" if "lr" in r else ""), fontsize=7)
        ax.set_xlabel("task evaluated", fontsize=7)
        ax.set_ylabel("after task", fontsize=7)
    curve = axes[-1]
    for r in results:
        if "task1_over_rounds" in r:
            curve.plot(r["task1_over_rounds"], label=r["method"])
    curve.set_title("task 1 accuracy over rounds", fontsize=7)
    curve.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: dict) -> list[str]:
    base = report["base_perplexity"]
    md = [
        f"### stream: {report['stream']}, learning rate {report['lr']:g} (held-out perplexity of the base model: "
        f"{base:.1f})",
        "",
        "| method | ACC | BWT | forgetting | plasticity | held-out perplexity | learning time | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if any("recurring_retained" in r for r in report["results"]):
        md[2] = md[2].replace("| ACC |", "| ACC (one-offs) | recurring retained |")
        md[3] += "---|"
    names = list(next((r["variants"] for r in report["results"] if "variants" in r), {}))
    if names:
        md[2] += f" rewritten prompts ({' / '.join(names)}) | the same, white space aside |"
        md[3] += "---|---|"
    for r in report["results"]:
        cells = [f"{r[k]:+.2f}" if k in r else "" for k in ("bwt", "forgetting")]
        acc = f"{r['acc']:.2f}" + (f" | {r['recurring_retained']:.2f}" if "recurring_retained" in r else "")
        plasticity = f"{r['plasticity']:.2f}" if "plasticity" in r else ""
        rewritten = "".join(
            f" {' / '.join(f'{r[kind][n]:.2f}' for n in names) if kind in r else ''} |"
            for kind in ("variants", "variants_text")
            if names
        )
        md.append(
            f"| {r['method']} | {acc} | {cells[0]} | {cells[1]} | {plasticity} | "
            f"{r['perplexity']:.1f} ({r['perplexity'] / base - 1:+.0%}) | {r['learn_s']:.1f} s | "
            f"{r['trainable_parameters']:,} |" + rewritten
        )
    return md


def best(reports: list[dict], method: str) -> dict:
    """A method's result at its best learning rate (highest ACC, then lowest held-out perplexity)."""
    runs = [{**r, "lr": rep["lr"], "base": rep["base_perplexity"]} for rep in reports for r in rep["results"]]
    runs = [r for r in runs if r["method"] == method]
    return max(runs, key=lambda r: (r["acc"], -r["perplexity"]))


def best_of_each(reports: list[dict]) -> dict:
    """One report holding every method at its best learning rate (for the plot)."""
    return {"results": [best(reports, r["method"]) for r in reports[0]["results"]]}


def targets(reports: list[dict]) -> tuple[dict, list[str]]:
    """The issue's targets on the facts stream, each method at its best learning rate."""
    dl, seq = best(reports, "DynamicLoRA"), best(reports, SequentialLoRA.name)
    multi = best(reports, MultiTaskLoRA.name)
    rows = [
        ("BWT ≥ −0.05 (sequential LoRA forgets more)", f"{dl['bwt']:+.2f} (sequential LoRA {seq['bwt']:+.2f})",
         dl["bwt"] >= -0.05 and seq["bwt"] < dl["bwt"]),
        ("ACC ≥ 0.85 × multi-task", f"{dl['acc']:.2f} vs {multi['acc']:.2f}", dl["acc"] >= 0.85 * multi["acc"]),
        ("plasticity ≥ 0.9 × sequential LoRA's", f"{dl['plasticity']:.2f} vs {seq['plasticity']:.2f}",
         dl["plasticity"] >= 0.9 * seq["plasticity"]),
        ("held-out perplexity rises ≤ 2%", f"{dl['perplexity'] / dl['base'] - 1:+.2%}",
         dl["perplexity"] <= 1.02 * dl["base"]),
        ("wall time ≤ 2× sequential LoRA's", f"{dl['learn_s']:.1f} s vs {seq['learn_s']:.1f} s "
         f"(×{dl['learn_s'] / seq['learn_s']:.2f})", dl["learn_s"] <= 2 * seq["learn_s"]),
    ]  # fmt: skip
    md = [
        f"### targets (facts stream; DynamicLoRA at lr {dl['lr']:g}, sequential LoRA at {seq['lr']:g}, "
        f"multi-task at {multi['lr']:g}: each method's best learning rate)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows],
    ]
    return {name: {"measured": value, "met": ok} for name, value, ok in rows}, md


GATE_CONFIGS = {
    "pooled": {"route_match": "pooled"},
    "tokens": {"route_match": "tokens"},
    "facts": FACT_CIRCUITS,
    "facts-late": FACTS_LATE,
}


def gates(quick: bool, lr: float, which: list[str]) -> dict:
    """DynamicLoRA on the facts stream with the pooled gate, token gates and fact circuits (token gates on rank-1
    circuits of the value projections, trained with the chat variant), the ones in ``which``, in one run."""
    stream = streams.facts(tasks=3, per_task=2, rounds=2) if quick else streams.facts()
    tok = fresh(quick)[1]
    chunks = held_out_chunks(tok, quick)
    agents = sorted({t.agent for t in stream.tasks})
    results = []
    for name in which:
        learner = DynamicLoRAMethod(fresh(quick)[0], tok, agents, lr=lr, **GATE_CONFIGS[name])
        results.append(run(stream, learner, tok, chunks))
    return {"stream": stream.name, "lr": lr, "base_perplexity": base_perplexity(fresh(quick)[0], chunks),
            "results": results}  # fmt: skip


ALL_GATES = "pooled,tokens,facts"  # bench continual --gates: the record continual-gates-cpu


def main(argv: list[str] | None = None) -> dict:
    args = arguments(
        __doc__,
        argv,
        extra=lambda p: (
            p.add_argument("--gates", nargs="?", const=ALL_GATES, help=f"DynamicLoRA alone, e.g. {ALL_GATES}"),
            p.add_argument("--lr", type=float, help="with --gates: the learning rate (default 3e-3 on a real model)"),
        ),
    )
    if args.gates:  # DynamicLoRA alone, three ways: about 15 min on the default model
        lr = args.lr or (LEARNING_RATES[0] if args.quick or selected_model() == "stdlib" else 3e-3)
        chosen = args.gates.split(",")
        report = gates(args.quick, lr, chosen)
        label = "gates" if args.gates == ALL_GATES else "-".join(chosen)  # (a subset: a record of its own)
        name = f"continual-{label}-cpu" + ("-quick" if args.quick else model_suffix())
        md = ["# Continual learning: pooled gates, token gates, fact circuits (cpu)", "", *table(report), ""]
        write(Path(args.out), name, {"streams": [report]}, "\n".join(md) + "\n")
        print("\n".join(md))
        return {"reports": [report]}
    if args.quick:
        plan = [(streams.facts(tasks=3, per_task=2, rounds=2), LEARNING_RATES[0], (), ())]
    elif selected_model() != "stdlib":  # a real model: a step costs ~20x the stdlib model's; ~25 min on 2 cores
        plan = [(streams.facts(), 3e-3, (4,), (0.6,))]
    else:  # ticks: one per round of the facts stream (4 items), one per round of the selective stream (6 items)
        plan = [(streams.facts(), lr, (4,), (0.6,)) for lr in LEARNING_RATES]
        plan += [(streams.selective(), lr, (6,), ()) for lr in (LEARNING_RATES[0], 1e-3)]
        plan += [(streams.styles(), lr, (), ()) for lr in (LEARNING_RATES[0], 1e-3)]
    reports = [compare(stream, args.quick, lr, ticks, radii) for stream, lr, ticks, radii in plan]
    facts = [r for r in reports if r["stream"] == "facts"]
    checks, md_targets = targets(facts)
    name = "continual-cpu" + ("-quick" if args.quick else model_suffix())
    md = ["# Continual learning (cpu)", "", *md_targets, ""]
    for report in reports:
        md += [*table(report), ""]
    out = Path(args.out)
    write(out, name, {"streams": reports, "targets": checks}, "\n".join(md) + "\n")
    _plot(best_of_each(facts), out / f"{name}.png")
    print("\n".join(md))
    return {"reports": reports, "targets": checks}
