"""The continual-learning harness: GEM metrics by hand, the evaluation criterion, and every method run end to
end on a short stream of a tiny model (the full comparison is a benchmark)."""

from __future__ import annotations

import math

import pytest
import torch

from dynamiclora.continual import streams
from dynamiclora.continual.methods import (
    DynamicLoRAMethod,
    FastSlowEMA,
    OrthogonalLoRA,
    Replay,
    SequentialLoRA,
    encode,
    produces,
)
from dynamiclora.continual.metrics import summarize
from dynamiclora.testing import tiny_model


def test_gem_metrics_by_hand():
    R = [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.5, 1.0]]
    m = summarize(R)
    assert m["acc"] == pytest.approx(2 / 3) and m["plasticity"] == 1.0
    assert m["bwt"] == pytest.approx(-0.5) and m["forgetting"] == pytest.approx(0.5)
    assert summarize([[0.0, 0.0], [1.0, 1.0]])["bwt"] == 1.0  # learning task 2 helped task 1: positive transfer


def test_streams_hold_what_they_promise():
    s = streams.facts(tasks=5, per_task=4)
    keys = [p for t in s.tasks for p, _ in t.items]
    assert len(s.tasks) == 5 and len(set(keys)) == 20  # five tasks of new, distinct facts
    sel = streams.selective()
    assert sel.recurring and not set(sel.recurring) & {i for t in sel.tasks for i in t.items}
    sty = streams.styles()
    assert len({t.agent for t in sty.tasks}) == 3 and len({tuple(p for p, _ in t.items) for t in sty.tasks}) == 1


def test_produces_is_greedy_generation_of_the_completion():
    model, tok = tiny_model("llama")
    method = DynamicLoRAMethod(model, tok, ["learner"])
    example = encode(tok, "x =", " 7")
    for _ in range(4):
        method.learn("learner", example)
    ids = torch.tensor([example[0] + example[1]])
    generated = method.dl.agent("learner").generate("x =", max_new_tokens=4, use_cache=False).text
    assert produces(method.logits("learner", ids, len(example[0])), example) == (generated == " 7")


@pytest.mark.parametrize("cls", [DynamicLoRAMethod, SequentialLoRA, Replay, OrthogonalLoRA, FastSlowEMA])
def test_every_method_runs_a_stream_end_to_end(cls):
    from dynamiclora.bench.continual import run

    model, tok = tiny_model("llama")
    stream = streams.facts(tasks=2, per_task=2, rounds=1)
    method = cls(model, tok, ["learner"]) if cls is DynamicLoRAMethod else cls(model, tok)
    chunks = [torch.randint(1, len(tok), (1, 32)) for _ in range(2)]
    result = run(stream, method, tok, chunks)
    assert len(result["R"]) == 2 and all(0 <= v <= 1 for row in result["R"] for v in row)
    assert result["trainable_parameters"] > 0 and math.isfinite(result["perplexity"])
    assert len(result["task1_over_rounds"]) == 2 and result["interactions"] == 4
    if cls is OrthogonalLoRA:  # one adapter per task (and a fresh one for the next), the old ones frozen
        assert method.tasks == 3
    if cls in (Replay, FastSlowEMA):
        assert len(method.buffer) == 4


def test_the_orthogonality_penalty_pulls_a_new_adapter_off_the_old_subspace():
    model, tok = tiny_model("llama")
    method = OrthogonalLoRA(model, tok, penalty=50.0)
    example = encode(tok, "x =", " 7")
    method.learn("learner", example)
    method.end_task([example])

    @torch.no_grad()
    def overlap() -> float:
        total = 0.0
        for module in method.model.modules():
            if hasattr(module, "lora_A") and "t1" in module.lora_A:
                total += float((module.lora_A["t1"].weight @ module.lora_A["t0"].weight.T).pow(2).sum())
        return total

    before = overlap()
    for _ in range(3):
        method.learn("learner", encode(tok, "y =", " 3"))
    assert overlap() < before


@pytest.mark.parametrize(
    "stream",
    [
        streams.facts(tasks=3, per_task=2, rounds=3),
        streams.selective(tasks=3, per_task=2, recurring=2, rounds=2),
        streams.styles(rounds=3),
    ],
    ids=lambda s: s.name,
)
def test_each_stream_quick_dynamiclora_learns_without_touching_what_it_did_not_learn(stream):
    """The fast variant of every stream on a tiny model: routing keeps the held-out text's logits exactly those of
    the base model, and no task learned later lowers an earlier task's accuracy."""
    from dynamiclora.bench.continual import base_perplexity, run

    model, tok = tiny_model("llama")
    agents = sorted({t.agent for t in stream.tasks})
    chunks = [torch.randint(1, len(tok), (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    base = base_perplexity(model, chunks)
    result = run(stream, DynamicLoRAMethod(model, tok, agents), tok, chunks)
    R = result["R"]
    assert result["perplexity"] == pytest.approx(base, rel=1e-6)
    assert all(R[-1][i] >= R[i][i] for i in range(len(R))), R  # nothing forgotten
    assert result["plasticity"] > 0
    if stream.recurring:
        assert result["recurring_retained"] > 0


def test_the_text_metric_reads_the_answer_with_white_space_aside_and_whole():
    """A rewritten prompt answered on a line of its own counts, and so does one that goes on after the taught
    text; another value, or the taught text going on within its word (``'pylon'.upper()``), does not."""
    from dynamiclora.bench.continual import text_accuracy
    from dynamiclora.continual.methods import Method, encode

    _, tokenizer = tiny_model("llama")

    class Answers(Method):  # greedy answers given in advance, one per prompt
        def __init__(self, answers: list[str]) -> None:
            self.answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]

        def greedy(self, agent, prompt, tokens, eos=None):
            return self.answers.pop(0)[:tokens]

        def learn(self, agent, example):
            pass

        def logits(self, agent, ids, prompt_tokens=None):
            raise AssertionError("not used")

        def trainable_parameters(self):
            return 0

    example = encode(tokenizer, "# getter\ndef get_zephyr_bucket():", " return 'pylon'")
    answers = ["\n    return 'pylon'", " return 'pylon'\n\ndef other():", " return 'pylon'.upper()", " return 'tye'"]
    hits = [text_accuracy(Answers([a]), "a", tokenizer, [example]) for a in answers]
    assert hits == [1.0, 1.0, 0.0, 0.0]
