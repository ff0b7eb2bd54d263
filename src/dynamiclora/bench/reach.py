"""Gate reach as facts accumulate: which gates the editing data's prompts reach while one agent learns its facts
in turn. A prompt that reaches another fact's gate gets that fact's circuit acting on it: the learner then needs
more calls to teach it (the two circuits pull apart), and a neighbour that reaches a gate may lose the base
model's own answer.

Each fact's gate is built by the learner's gate rules alone (no training: reach depends on the gates, not on the
circuits' weights), under three rules:

- *first prompt*: each fact's gate as the router gives its prompt, alone;
- *look-alike*: the learner's rule: a prompt that reaches a gate holding another answer gets a gate of its own,
  with a threshold above those facts' prompts (one that reaches a gate holding its own answer joins that gate);
- *look-alike, both ways*: the same, and the gates it reached are raised above it too
  (``LearningConfig.exclude_lookalikes``).

Reported per span of edits: earlier gates a taught prompt reaches; at the end: the share of each paraphrase kind
that reaches its own fact's gate (generalization needs it), that reaches another fact's gate, of neighbours
that reach any gate, and of the held-out perplexity's texts (``editing_data.heldout_texts``): sentences about a
taught subject that reach another fact's gate, neighbours' prompts with an answer of their kind that reach any.

Run: ``python benchmarks/reach.py`` (SmolLM2, 1,000 facts, a few minutes; ``--quick``: a tiny model, 60 facts;
``--strict``: strict gates, ``LearningConfig.route_strict``; ``--ordered``: ordered ones, ``route_ordered``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..continual.methods import FACT_CIRCUITS, DynamicLoRAMethod
from ..gates import Gate, TokenGateIndex
from .editing import chat_prompt
from .editing_data import PARAPHRASE_KINDS, facts, heldout_texts
from .record import arguments, model_path, model_suffix, selected_model, write

RULES = ("first prompt", "look-alike", "look-alike, both ways")


def spans(total: int) -> list[tuple[int, int]]:
    """Edit ranges to report: the first tenth, then the rest in four parts."""
    first = max(1, total // 10)
    bounds = [0, first] + [first + (total - first) * k // 4 for k in range(1, 5)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


@dataclass
class _Circuit:
    gate: Gate
    answer: str
    prompts: list[int] = field(default_factory=list)  # indices of the facts whose prompts are its keys


def teach(router, features: list[torch.Tensor], prompts: list[list[int]], answers: list[str], rule: str):
    """The gates after teaching every prompt in turn under ``rule``; per fact, its circuit and the earlier
    circuits its prompt reached when it was taught."""
    circuits: list[_Circuit] = []
    own, reached_before = [], []
    for i, (f, p) in enumerate(zip(features, prompts)):
        hit = TokenGateIndex([c.gate for c in circuits]).reached(f).tolist() if circuits else []
        reached = [j for j, h in enumerate(hit) if h]
        reached_before.append(len(reached))
        same = [j for j in reached if circuits[j].answer == answers[i]]
        if rule != "first prompt" and same:  # the same answer asked again: the prompt joins that gate
            j = min(same, key=lambda j: circuits[j].gate.distance(f))
            circuits[j].gate = router.extend_gate(circuits[j].gate, f, p, "editor")
            circuits[j].prompts.append(i)
            own.append(j)
            continue
        negatives = [features[k] for j in reached for k in circuits[j].prompts] if rule != "first prompt" else []
        if rule == "look-alike, both ways":
            for j in reached:
                circuits[j].gate = circuits[j].gate.excluding(f)
        circuits.append(_Circuit(router.new_gate(f, p, "editor", negatives), answers[i], [i]))
        own.append(len(circuits) - 1)
    return circuits, own, reached_before


def measure(model, tokenizer, total: int, strict: bool = False, ordered: bool = False) -> dict:
    fact_circuits = DynamicLoRAMethod(
        model, tokenizer, ["editor"], capacity=1, route_strict=strict, route_ordered=ordered, **FACT_CIRCUITS
    )
    router = fact_circuits.dl.runtime.router
    data = facts(total)
    encode = lambda text: list(tokenizer(text)["input_ids"])  # noqa: E731
    prompts = [encode(f.prompt) for f in data]
    features = router.features(prompts)
    paraphrases = {
        kind: router.features([chat_prompt(tokenizer, f.paraphrases[kind]) if kind == "chat" else
                               encode(f.paraphrases[kind]) for f in data])
        for kind in PARAPHRASE_KINDS
    }  # fmt: skip
    neighbours = router.features([encode(f.neighbour) for f in data])
    heldout = router.features([encode(t) for t in heldout_texts(data)])  # per fact: about its subject, a neighbour's
    out = {}
    for rule in RULES:
        circuits, own, before = teach(router, features, prompts, [f.target for f in data], rule)
        index = TokenGateIndex([c.gate for c in circuits])
        generalizes, strays = {}, {}
        for kind, feats in paraphrases.items():
            hits = [index.reached(f) for f in feats]
            generalizes[kind] = sum(bool(h[own[i]]) for i, h in enumerate(hits)) / total
            strays[kind] = sum(int(h.sum()) - int(h[own[i]]) > 0 for i, h in enumerate(hits)) / total
        out[rule] = {
            "spans": [
                {
                    "edits": [lo + 1, hi],
                    "reached_per_prompt": sum(before[lo:hi]) / (hi - lo),
                    "prompts_reaching_any": sum(b > 0 for b in before[lo:hi]) / (hi - lo),
                }
                for lo, hi in spans(total)
            ],  # fmt: skip
            "circuits": len(circuits),
            "own_gate_reached": generalizes,
            "other_gate_reached": strays,
            "neighbours_reaching_any": sum(bool(index.reached(f).any()) for f in neighbours) / total,
            "subject_text_reaching_other": sum(
                int(h.sum()) - int(h[own[i]]) > 0 for i, h in enumerate(index.reached(f) for f in heldout[::2])
            )
            / total,
            "neighbour_text_reaching_any": sum(bool(index.reached(f).any()) for f in heldout[1::2]) / total,
        }
    return out


def markdown(rules: dict, strict: bool = False, ordered: bool = False) -> str:
    kind = ", ".join(["strict"] * strict + ["ordered"] * ordered)
    title = "# Gate reach among taught facts" + (f", {kind} gates" if kind else "") + " (cpu)"
    lines = [title, "", "Earlier facts' gates a taught prompt reaches:", "",
             "| edits | " + " | ".join(f"{r}: per prompt / any" for r in rules) + " |",
             "|---|" + "---|" * len(rules)]  # fmt: skip
    for k, span in enumerate(next(iter(rules.values()))["spans"]):
        cells = [f"{r['spans'][k]['reached_per_prompt']:.2f} / {r['spans'][k]['prompts_reaching_any']:.2f}"
                 for r in rules.values()]  # fmt: skip
        lines.append(f"| {span['edits'][0]}–{span['edits'][1]} | " + " | ".join(cells) + " |")
    lines += ["", "After the last edit: paraphrases reaching their own fact's gate / another fact's gate "
              "(" + " / ".join(PARAPHRASE_KINDS) + "), neighbours reaching any gate; held-out texts: about a "
              "subject, reaching another fact's gate / a neighbour's with an answer, reaching any:", "",
              "| rule | circuits | own gate | another gate | neighbours | held-out texts |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rules.items():
        own = " / ".join(f"{r['own_gate_reached'][k]:.2f}" for k in PARAPHRASE_KINDS)
        other = " / ".join(f"{r['other_gate_reached'][k]:.2f}" for k in PARAPHRASE_KINDS)
        held = f"{r['subject_text_reaching_other']:.2f} / {r['neighbour_text_reaching_any']:.2f}"
        lines.append(f"| {name} | {r['circuits']} | {own} | {other} | {r['neighbours_reaching_any']:.2f} | {held} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--facts", type=int, help="how many facts (default 1,000; quick: 60)")
        parser.add_argument("--strict", action="store_true", help="strict gates (learning.route_strict)")
        parser.add_argument("--ordered", action="store_true", help="ordered gates (learning.route_ordered)")

    args = arguments(__doc__, argv, extra=extra)
    if args.quick:
        from ..testing import tiny_chat_model

        model, tokenizer = tiny_chat_model("llama")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_path(progress=True)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    total = args.facts or (60 if args.quick else 1000)
    rules = measure(model, tokenizer, total, args.strict, args.ordered)
    record = {
        "model": selected_model(),
        "facts": total,
        "strict": args.strict,
        "ordered": args.ordered,
        "rules": rules,
    }
    flags = "-strict" * args.strict + "-ordered" * args.ordered
    name = "reach-cpu" + flags + ("-quick" if args.quick else model_suffix())
    md = markdown(rules, args.strict, args.ordered)
    write(Path(args.out), name, record, md)
    print(md)
    return record
