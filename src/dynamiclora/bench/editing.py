"""Knowledge editing, measured as model editors measure it (EasyEdit, WISE): sequential edits by one agent, then
reliability (the taught prompts), generalization (held-out paraphrases of four kinds), locality (neighbours: the
same relation for entities never taught; general: real facts, code, chat: the base model's own continuation must
not move), learn time per edit, request overhead, and bytes per fact, at T = 1, 10, 100 (… 1,000) edits.

Each metric is EasyEdit's token accuracy under teacher forcing: the fraction of target tokens that are the
model's argmax (reliability, generalization), or of the base model's own next tokens that still are (locality).
Data: ``editing_data.py`` (fictional facts the base model cannot know). Methods: DynamicLoRA with the prototype
gate of the token embeddings (the default), DynamicLoRA with the gate on a middle layer's hidden state, and
sequential PEFT LoRA. Each edit is learned until the taught prompt reproduces its target (at most
``MAX_TRIES`` learn calls), as an editor applies each edit.

Run: ``python benchmarks/editing.py`` (SmolLM2, T up to 100; ``--quick``: a tiny random model, T up to 10).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from ..continual.methods import (
    FACT_CIRCUITS,
    FACTS_LATE,
    DynamicLoRAMethod,
    Method,
    Replay,
    SequentialLoRA,
    encode,
    perplexity,
)
from .checkpoint import EVERY, Checkpoint, Progress
from .editing_data import GENERAL, GENERAL_CHAT, PARAPHRASE_KINDS, Fact, facts, heldout_texts
from .record import arguments, fresh_models, model_suffix, selected_model, write
from .wise import WiseSideMemory

MAX_TRIES = 4  # learn calls per edit, stopping once the taught prompt reproduces the target
LOCAL_TOKENS = 4  # the base model's own next tokens that locality checks
KEY_BACKGROUND = FACTS_LATE["key_background"]  # facts-keys: directions of ordinary text a key is kept off
PERPLEXITY_FACTS = 100  # held-out perplexity: text about the first this many facts' subjects and neighbours


def chat_prompt(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))  # fmt: skip


class Probe:
    """The token ids of every evaluation prompt and target, and the base model's own continuations (locality)."""

    def __init__(self, tokenizer, model, edits: list[Fact], cache: Path | None = None, model_id: str = "") -> None:
        self.edits = [encode(tokenizer, f.prompt, f.target) for f in edits]
        self.paraphrases = {kind: [] for kind in PARAPHRASE_KINDS}
        for f in edits:
            for kind in PARAPHRASE_KINDS:
                if kind == "chat":
                    prompt = chat_prompt(tokenizer, f.paraphrases[kind])
                    target = list(tokenizer(f.target.strip(), add_special_tokens=False)["input_ids"])
                    self.paraphrases[kind].append((prompt, target))
                else:
                    p, c = encode(tokenizer, f.paraphrases[kind], f.target)
                    self.paraphrases[kind].append((p, c[:-1]))  # EOS is not part of what a paraphrase must give
        self.edits = [(p, c[:-1]) for p, c in self.edits]
        neighbours = [list(tokenizer(f.neighbour)["input_ids"]) for f in edits]
        general = [list(tokenizer(p)["input_ids"]) for p in GENERAL] + [
            chat_prompt(tokenizer, q) for q in GENERAL_CHAT
        ]
        known = self._known(cache, model_id)
        self.neighbours = [known.get(str(p)) or self._own(model, p) for p in neighbours]
        self.general = [known.get(str(p)) or self._own(model, p) for p in general]
        if cache is not None:  # the base model's continuations, for a run that resumes (minutes on SmolLM2)
            cache.parent.mkdir(parents=True, exist_ok=True)
            pairs = [[p, own] for p, own in self.neighbours + self.general]
            cache.write_text(json.dumps({"model": model_id, "local_tokens": LOCAL_TOKENS, "pairs": pairs}))
        chunk = lambda text: torch.tensor([tokenizer(text)["input_ids"]])  # noqa: E731
        self.heldout_facts = [chunk(t) for t in heldout_texts(edits[:PERPLEXITY_FACTS])]
        self.heldout_general = [chunk(t) for t in GENERAL]
        self.base_model = model

    def heldout(self, t: int) -> list[torch.Tensor]:
        """Held-out text after ``t`` edits: about the taught subjects so far (two per fact) and general text."""
        return self.heldout_facts[: 2 * t] + self.heldout_general

    @staticmethod
    def _known(cache: Path | None, model: str) -> dict[str, tuple[list[int], list[int]]]:
        """The base model's continuations saved in ``cache`` by a run on the same model, by prompt."""
        if cache is None or not cache.exists():
            return {}
        saved = json.loads(cache.read_text())
        if saved["model"] != model or saved["local_tokens"] != LOCAL_TOKENS:
            return {}
        return {str(p): (p, own) for p, own in saved["pairs"]}

    @staticmethod
    @torch.no_grad()
    def _own(model, prompt: list[int]) -> tuple[list[int], list[int]]:
        ids = list(prompt)
        for _ in range(LOCAL_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return prompt, ids[len(prompt) :]


@torch.no_grad()
def token_accuracy(method: Method, agent: str, pairs: list[tuple[list[int], list[int]]]) -> float:
    hits = total = 0
    for p, c in pairs:
        logits = method.logits(agent, torch.tensor([p + c]), len(p))
        predicted = logits[0, len(p) - 1 : len(p) - 1 + len(c)].argmax(-1).cpu()
        hits += int((predicted == torch.tensor(c)).sum())
        total += len(c)
    return hits / max(total, 1)


def reproduces(method: Method, agent: str, pair: tuple[list[int], list[int]]) -> bool:
    return token_accuracy(method, agent, [pair]) == 1.0


def bytes_of(method: Method) -> int:
    if isinstance(method, DynamicLoRAMethod):
        total = 0
        for key, scope in method.dl.hierarchy.scopes.items():
            for c in scope.circuits.values():
                total += 4 * sum(a.numel() + b.numel() for a, b in c.factors.values())
                if c.gate is not None:
                    total += 4 * (c.gate.keys.numel() + c.gate.radii.numel())
        return total
    return 4 * method.trainable_parameters()


@torch.no_grad()
def forward_ratio(
    method: Method, agent: str, base, prompts: list[list[int]], repeats: int = 3, first_time: bool = False
) -> float:
    """Median time of the method's forward over ``prompts`` (routing included) over the base model's, measured
    round-robin. ``first_time``: every forward routes its prompt afresh, as a new request does (its route
    features not yet remembered: a partial base forward before the adapted one); otherwise they are remembered,
    as while a request decodes."""
    router = method.dl.runtime.router if isinstance(method, DynamicLoRAMethod) else None
    mine, theirs = [], []
    for _ in range(repeats):
        for ids in prompts:
            x = torch.tensor([ids])
            if first_time and router is not None:
                router.forget_features()
            t0 = time.perf_counter()
            method.logits(agent, x, len(ids))
            t1 = time.perf_counter()
            base(input_ids=x)
            mine.append(t1 - t0)
            theirs.append(time.perf_counter() - t1)
    return statistics.median(mine) / statistics.median(theirs)


def evaluate(method: Method, agent: str, probe: Probe, t: int) -> dict:
    out = {
        "reliability": token_accuracy(method, agent, probe.edits[:t]),
        "generalization": {k: token_accuracy(method, agent, v[:t]) for k, v in probe.paraphrases.items()},
        "locality_neighbour": token_accuracy(method, agent, probe.neighbours[:t]),
        "locality_general": token_accuracy(method, agent, probe.general),
        # held-out text about the taught subjects and their neighbours, over the base model's: 0 = unchanged
        "perplexity_change": method.perplexity(agent, probe.heldout(t))
        / perplexity(lambda ids: probe.base_model(input_ids=ids).logits, probe.heldout(t))
        - 1,
    }
    out["generalization_mean"] = statistics.mean(out["generalization"].values())
    return out


def run(
    make,
    probe: Probe,
    steps: list[int],
    base,
    agent: str = "editor",
    saved=lambda partial: None,
    checkpoint: Checkpoint | None = None,
    evaluate_again: bool = False,
) -> dict:
    """Edit facts one by one with a fresh method; evaluate after the T-th edit for every T in ``steps``. ``saved``
    gets the result so far after each evaluation (a long run that is cut off keeps what it measured); with
    ``checkpoint`` (DynamicLoRA methods), a run goes on from the progress saved there, and saves its own every
    ``checkpoint.EVERY`` edits and after each evaluation. ``evaluate_again``: a run resumed just after an
    evaluation measures that memory again with this code (its row replaced), learning nothing."""
    method = make()
    if not isinstance(method, DynamicLoRAMethod):
        checkpoint = None
    progress = checkpoint.restore(method, base) if checkpoint is not None else Progress({})
    rows, learn_s, tries = progress.rows, progress.learn_s, progress.learn_calls
    if progress.edits:
        print(f"  resumed after edit {progress.edits} from {checkpoint.directory}", flush=True)

    def measured() -> dict:
        per_edit = {"learn_s": learn_s, "learn_calls": tries, "sessions_began_at": progress.sessions}
        return {"method": method.name, "rows": rows, "per_edit": per_edit}

    def measure(t: int) -> None:  # evaluate the memory after the t-th edit, a row of the record
        r = evaluate(method, agent, probe, t)
        recent = learn_s[-max(10, t // 10) :]  # the last tenth of the edits (at least ten)
        r.update(
            edits=t,
            learn_s_per_edit=statistics.mean(learn_s),
            learn_s_recent=statistics.mean(recent),
            learn_calls_per_edit=statistics.mean(tries),
            bytes_per_fact=bytes_of(method) / t,
            forward_ratio=forward_ratio(method, agent, base, [p for p, _ in probe.general]),
            # a new request for a taught fact (it reaches its circuit), routed from scratch
            forward_ratio_first=forward_ratio(
                method, agent, base, [p for p, _ in probe.edits[max(0, t - 16) : t]], first_time=True
            ),
        )
        if isinstance(method, DynamicLoRAMethod):  # what the memory dynamics did to the facts meanwhile
            circuits = [c for scope in method.dl.hierarchy.scopes.values() for c in scope.circuits.values()]
            r.update(
                circuits=len(circuits),
                strength_mean=statistics.mean(c.strength for c in circuits) if circuits else 0.0,
                vigor_mean=statistics.mean(c.vigor for c in circuits) if circuits else 0.0,  # (disuse fades it)
                forgotten=len(method.dl.memory.forgotten),
            )
        rows.append(r)
        saved(measured())
        print(f"  {method.name} T={t}: rel {r['reliability']:.2f} gen {r['generalization_mean']:.2f} "
              f"loc {r['locality_neighbour']:.2f}/{r['locality_general']:.2f}", flush=True)  # fmt: skip

    if evaluate_again:
        if progress.edits not in steps:
            raise ValueError(
                f"--evaluate-again measures a memory saved just after an evaluation (after T in {steps} edits), but "
                + (f"the checkpoint holds {progress.edits} edits" if checkpoint else "there is no --checkpoint")
                + "; give the --checkpoint directory of a run that reached one of its --steps"
            )
        rows[:] = [r for r in rows if r["edits"] != progress.edits]
        measure(progress.edits)
    for i, pair in enumerate(probe.edits[: max(steps)]):
        if i < progress.edits:
            continue
        t0 = time.perf_counter()
        n = 0
        for n in range(1, MAX_TRIES + 1):
            method.learn(agent, (pair[0], pair[1] + probe_eos(method)))
            if reproduces(method, agent, pair):
                break
        method.end_task([(pair[0], pair[1] + probe_eos(method))])  # (replay: the edit joins its buffer)
        learn_s.append(time.perf_counter() - t0)
        tries.append(n)
        progress.edits = i + 1
        if (i + 1) % 50 == 0:  # progress of a long run, useful even if it is cut off
            print(f"  edit {i + 1}: last 50 {statistics.mean(learn_s[-50:]):.2f} s/edit, "
                  f"{statistics.mean(tries[-50:]):.2f} learn calls/edit", flush=True)  # fmt: skip
        if i + 1 in steps:
            measure(i + 1)
        if checkpoint is not None and ((i + 1) % EVERY == 0 or i + 1 in steps):
            checkpoint.save(method, progress)  # after the evaluation: what it read is part of the memory's history
    out = measured()
    if isinstance(method, DynamicLoRAMethod):  # what a PEFT export of the memory keeps of it
        exported = ExportedAdapter(method, agent, base)
        out["exported"] = evaluate(exported, agent, probe, max(steps))
        out["exported"]["forward_ratio"] = forward_ratio(exported, agent, base, [p for p, _ in probe.general])
        e = out["exported"]
        print(f"  exported as PEFT: rel {e['reliability']:.2f} gen {e['generalization_mean']:.2f} "
              f"loc {e['locality_neighbour']:.2f}/{e['locality_general']:.2f}", flush=True)  # fmt: skip
    return out


class ExportedAdapter(Method):
    """The agent's whole stack exported with ``export_peft`` and loaded by PEFT on a fresh copy of the base model:
    what a user who takes the memory elsewhere gets (every gated circuit acting everywhere)."""

    def __init__(self, method: DynamicLoRAMethod, agent: str, base) -> None:
        import tempfile
        import warnings

        from peft import PeftModel

        from ..errors import GateLostWarning

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", GateLostWarning)  # the loss is what this measures
            method.dl.export_peft(tmp, agent=agent)
            self.model = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()  # (the unadapted base model)
        self.name = f"{method.name}, exported as PEFT"

    def learn(self, agent: str, example) -> None:
        raise NotImplementedError("an exported adapter is evaluated, not trained")

    def logits(self, agent: str, ids: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def trainable_parameters(self) -> int:
        return 0


def probe_eos(method: Method) -> list[int]:
    tokenizer = method.dl.tokenizer if isinstance(method, DynamicLoRAMethod) else method.tokenizer
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--steps", help="edit counts, e.g. 1,10,100")
        parser.add_argument(
            "--methods",
            help="of prototype, tokens, facts, facts-strict, facts-local, facts-keys, facts-late, facts-lower,"
            " tokens-still, peft, replay, wise",
        )
        parser.add_argument(
            "--checkpoint",
            help="a directory where a DynamicLoRA method's run keeps its progress (every 50 edits), and from which a"
            " run cut off goes on when started again with the same arguments",
        )
        parser.add_argument(
            "--evaluate-again",
            action="store_true",
            help="with --checkpoint, a run saved just after an evaluation measures that memory again with the code"
            " now checked out (its row replaced; nothing is learned, and the PEFT export is measured too)",
        )
        parser.add_argument(
            "--tick-interval",
            type=int,
            default=100,
            help="DynamicLoRA methods: interactions between ticks (the memory dynamics; 0: none). A smaller interval"
            " gives a short run the ticks, and so the decay, of a long one",
        )

    args = arguments(__doc__, argv, extra=extra)
    fresh, tokenizer = fresh_models(args.quick)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [1, 10] if args.quick else [1, 10, 100]
    model = fresh()
    data = facts(max(steps))
    checkpoints = Path(args.checkpoint) if args.checkpoint else None
    model_id = "tiny random chat Llama" if args.quick else selected_model()  # what a checkpoint belongs to
    probe = Probe(tokenizer, model, data, checkpoints / "probe.json" if checkpoints else None, model_id)
    capacity = max(steps)
    ticks = args.tick_interval

    def facts_method(circuits=FACT_CIRCUITS, **options):  # fact circuits with these DynamicLoRAMethod options
        return lambda: DynamicLoRAMethod(
            fresh(), tokenizer, ["editor"], tick_interval=ticks, capacity=capacity, **{**circuits, **options}
        )

    methods = {
        "prototype": (
            "prototype gate (embeddings)",
            lambda: DynamicLoRAMethod(fresh(), tokenizer, ["editor"], tick_interval=ticks, capacity=capacity),
        ),
        "tokens": (
            "token gate (distinctive token states)",
            lambda: DynamicLoRAMethod(
                fresh(), tokenizer, ["editor"], tick_interval=ticks, capacity=capacity, route_match="tokens"
            ),
        ),
        "facts": ("fact circuits: token gate, rank 1 on v_proj, chat variant", facts_method()),
        "facts-strict": ("fact circuits, strict gates", facts_method(route_strict=True)),
        "facts-local": (
            "fact circuits, strict gates, subject locality",
            facts_method(route_strict=True, subject_locality=2.0),
        ),
        "facts-keys": (
            "fact circuits, strict gates, subject locality, keys off the background",
            facts_method(route_strict=True, subject_locality=2.0, key_background=KEY_BACKGROUND),
        ),
        "facts-late": (
            "fact circuits as facts-keys, from the route layer on (routed inside the forward)",
            facts_method(FACTS_LATE),
        ),
        "facts-lower": (
            "fact circuits as facts-late, also trained on the prompt in lower case",
            facts_method(FACTS_LATE, learn_variants=("chat", "lower")),
        ),
        "tokens-still": (  # diagnostic: the same without ticks (no decay of the facts not used since)
            "token gate, no ticks",
            lambda: DynamicLoRAMethod(
                fresh(), tokenizer, ["editor"], tick_interval=0, capacity=capacity, route_match="tokens"
            ),
        ),
        "peft": ("sequential LoRA (PEFT)", lambda: _peft(model, tokenizer)),
        "replay": ("experience replay (PEFT)", lambda: _peft(model, tokenizer, Replay)),
        "wise": ("WISE-style side memory", lambda: _with_tokenizer(WiseSideMemory(model, tokenizer), tokenizer)),
    }
    everything = ["prototype", "tokens", "facts", "peft", "replay", "wise"]
    default = ["prototype", "facts", "wise"] if args.quick else everything
    chosen = args.methods.split(",") if args.methods else default
    name = "editing-cpu" + ("-quick" if args.quick else model_suffix()) + (f"-tick{ticks}" if ticks != 100 else "")
    results = []

    def save(partial: list[dict], complete: bool) -> dict:
        record = {
            "model": selected_model(),
            "steps": steps,
            "methods": partial,
            "families": sorted({f.family for f in data}),
            "complete": complete,
        }
        write(Path(args.out), name, record, _markdown(partial))
        return record

    for label, make in (methods[k] for k in chosen):
        print(label, flush=True)
        t0 = time.perf_counter()
        r = run(
            make,
            probe,
            steps,
            model,
            saved=lambda p: save(results + [{**p, "label": label}], False),
            checkpoint=Checkpoint(checkpoints, label, {"steps": steps, "model": model_id, "ticks": ticks})
            if checkpoints
            else None,
            evaluate_again=args.evaluate_again,
        )
        r["label"], r["wall_s"] = label, time.perf_counter() - t0
        results.append(r)
    record = save(results, True)
    plot(results, Path(args.out) / f"{name}.png")
    print(_markdown(results))
    return record


def plot(results: list[dict], path: Path) -> None:
    """Reliability, generalization and locality (neighbours) against the number of edits, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("reliability", "reliability"), ("generalization_mean", "generalization"),
               ("locality_neighbour", "locality (neighbours)"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, metrics):
        for r in results:
            ax.plot([row["edits"] for row in r["rows"]], [row[key] for row in r["rows"]], marker="o", label=r["label"])
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("edits (T)")
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PEFT_LR = 1e-3  # sequential LoRA at DynamicLoRA's 1e-2 wrecks the model within one edit (locality 0.00)


def _peft(model, tokenizer, kind=SequentialLoRA) -> Method:
    return _with_tokenizer(kind(model, tokenizer, lr=PEFT_LR), tokenizer)


def _with_tokenizer(method: Method, tokenizer) -> Method:
    method.tokenizer = tokenizer
    return method


def _markdown(results: list[dict]) -> str:
    lines = [
        "# Knowledge editing (cpu)",
        "",
        "| method | T | reliability | generalization (" + " / ".join(PARAPHRASE_KINDS) + ") | mean | "
        "locality neighbour | locality general | held-out perplexity | learn s/edit (last tenth) | bytes/fact "
        "| forward / base (decoding / a new request) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = [(r["label"], row) for row in r["rows"]]
        if "exported" in r:  # the memory exported as PEFT, after the last edit
            rows.append((f"{r['label']}, exported as PEFT", {**r["rows"][-1], **r["exported"], "exported": True}))
        for label, row in rows:
            g = " / ".join(f"{row['generalization'][k]:.2f}" for k in PARAPHRASE_KINDS)
            ppl = f"{row['perplexity_change']:+.1%}" if "perplexity_change" in row else "–"
            learn = "–" if row.get("exported") else f"{row['learn_s_per_edit']:.2f} ({row['learn_s_recent']:.2f})"
            first = (
                "–"
                if row.get("exported") or "forward_ratio_first" not in row
                else f"{row['forward_ratio_first']:.2f}×"
            )
            lines.append(
                f"| {label} | {row['edits']} | {row['reliability']:.2f} | {g} | {row['generalization_mean']:.2f} "
                f"| {row['locality_neighbour']:.2f} | {row['locality_general']:.2f} | {ppl} | {learn} "
                f"| {row['bytes_per_fact'] / 1e3:,.0f} KB | {row['forward_ratio']:.2f}× / {first} |"
            )
    return "\n".join(lines) + "\n"
