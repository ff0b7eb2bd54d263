"""Gate reach as facts accumulate: for each taught prompt of the editing data, how many earlier facts' gates it
reaches. Each gate is what the learner gives a fact's first prompt (fact circuits' token gate, without the
look-alike rule's negatives). A prompt that reaches another fact's gate gets that fact's circuit acting on it.

Run: ``python benchmarks/reach.py`` (SmolLM2, 1,000 facts, about a minute; ``--quick``: a tiny model, 60 facts).
"""

from __future__ import annotations

from pathlib import Path

from ..continual.methods import FACT_CIRCUITS, DynamicLoRAMethod
from ..gates import TokenGateIndex
from .editing_data import facts
from .record import arguments, model_path, model_suffix, selected_model, write


def spans(total: int) -> list[tuple[int, int]]:
    """Edit ranges to report: the first tenth, then the rest in four parts."""
    first = max(1, total // 10)
    bounds = [0, first] + [first + (total - first) * k // 4 for k in range(1, 5)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def measure(model, tokenizer, total: int) -> list[dict]:
    router = DynamicLoRAMethod(model, tokenizer, ["editor"], capacity=1, **FACT_CIRCUITS).dl.runtime.router
    prompts = [list(tokenizer(f.prompt)["input_ids"]) for f in facts(total)]
    features = router.features(prompts)
    index = TokenGateIndex([router.new_gate(f, p, "editor") for f, p in zip(features, prompts)])
    rows = []
    for lo, hi in spans(total):
        reached = [index.reached(features[i])[:i] for i in range(lo, hi)]  # the facts taught before this one
        rows.append(
            {
                "edits": [lo + 1, hi],
                "reached_per_prompt": sum(int(r.sum()) for r in reached) / (hi - lo),
                "prompts_reaching_any": sum(bool(r.any()) for r in reached) / (hi - lo),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--facts", type=int, help="how many facts (default 1,000; quick: 60)")

    args = arguments(__doc__, argv, extra=extra)
    if args.quick:
        from ..testing import tiny_chat_model

        model, tokenizer = tiny_chat_model("llama")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_path(progress=True)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    total = args.facts or (60 if args.quick else 1000)
    rows = measure(model, tokenizer, total)
    record = {"model": selected_model(), "facts": total, "rows": rows}
    lines = [
        "# Gate reach among taught facts (cpu)",
        "",
        "| edits | earlier facts' gates reached per prompt | prompts that reach any |",
        "|---|---|---|",
        *(
            f"| {r['edits'][0]}–{r['edits'][1]} | {r['reached_per_prompt']:.2f} | {r['prompts_reaching_any']:.2f} |"
            for r in rows
        ),
    ]
    name = "reach-cpu" + ("-quick" if args.quick else model_suffix())
    md = "\n".join(lines) + "\n"
    write(Path(args.out), name, record, md)
    print(md)
    return record
