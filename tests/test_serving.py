"""Continuous batching, streaming and logprobs: rows joining a running decode get exactly their tokens alone, a
learn waits for its agent's rows, streams arrive while decoding and equal the whole text, a client that leaves
frees its row, and logprobs are the model's."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from dynamiclora.server import create_app
from dynamiclora.server.engine import Engine
from dynamiclora.server.scheduler import Completion, GenerateJob, Scheduler, TextStream

from .conftest import make_dl, populate
from .server_util import ADMIN, live, register

PROMPTS = {"a": "def parse(text):", "b": "x = [", "c": "import os\nimport"}


def team():
    dl = make_dl()
    populate(dl, {"a": ("s1", "d1"), "b": ("s1", "d1"), "c": ("s2", "d1")}, per_scope=1)
    return dl


def alone(dl, agent: str, max_tokens: int) -> list[int]:
    return dl.generate_batch([(agent, PROMPTS[agent])], max_new_tokens=max_tokens, stop_at_eos=False)[0].token_ids


def job(dl, agent: str, max_tokens: int) -> GenerateJob:
    return GenerateJob(agent, PROMPTS[agent], dl.encode(PROMPTS[agent]), max_tokens)


def test_rows_that_join_a_running_decode_get_exactly_their_tokens_alone():
    """a starts; b joins after 3 steps, c after 6, with prompts of other lengths; every row leaves at its own
    length. One forward serves all three at once (at different positions), and each gets its tokens alone."""
    dl = team()
    dl.config.generation.stop_at_eos = False
    lengths = {"a": 12, "b": 9, "c": 5}
    expected = {a: alone(dl, a, n) for a, n in lengths.items()}
    done: dict[str, Completion] = {}
    sched = Scheduler(dl.runtime, dl.wavegen, use_cache=False, on_finished=lambda j, c: done.setdefault(j.agent_id, c))
    sched.admit([job(dl, "a", lengths["a"])])
    shared_steps = 0
    for step in range(40):
        if step == 3:
            sched.admit([job(dl, "b", lengths["b"])])
        if step == 6:
            sched.admit([job(dl, "c", lengths["c"])])
        if not sched.rows:
            break
        if len({len(r.tokens) for r in sched.rows}) == 3:
            shared_steps += 1  # three rows at three different positions in one forward
        sched.step()
    assert shared_steps > 0 and set(done) == {"a", "b", "c"}
    for agent, completion in done.items():
        assert completion.token_ids == expected[agent], agent
        assert completion.finish_reason == "length" and completion.completion_tokens == lengths[agent]


def test_a_seeded_sampled_row_draws_the_same_tokens_alone_or_beside_other_sampled_rows():
    """Sampling is per row: a batch-mate's draws never move a row's tokens (exactness: nothing outside the
    request and the content its snapshot names)."""
    dl = team()
    dl.config.generation.stop_at_eos = False

    def sampled(agent: str, seed: int) -> GenerateJob:
        return replace(job(dl, agent, 10), temperature=1.0, seed=seed)

    def decode(jobs: list[GenerateJob], joining_at: int | None = None) -> dict[str, list[int]]:
        done: dict[str, list[int]] = {}
        sched = Scheduler(dl.runtime, dl.wavegen, False, lambda j, c: done.setdefault(j.agent_id, c.token_ids))
        sched.admit(jobs[:1])
        for step in range(40):
            if step == joining_at:
                sched.admit(jobs[1:])
            if not sched.rows:
                break
            sched.step()
        return done

    alone = decode([sampled("a", 7)])["a"]
    assert decode([sampled("a", 7), sampled("b", 8)], joining_at=2)["a"] == alone
    assert decode([sampled("b", 8), sampled("a", 7)], joining_at=0)["a"] == alone  # started beside b
    assert decode([sampled("a", 9)])["a"] != alone  # the seed does decide


def test_a_learn_waits_for_its_agents_running_rows(tmp_path):
    """A learn into a, queued behind a's request, runs once that row has finished: the row gets what a's stack
    said when it started, though the learn changes what a says."""
    dl = team()
    dl.config.generation.stop_at_eos = False
    before = alone(dl, "a", 16)
    engine = Engine(dl, tmp_path / "state", max_batch=4)
    order: list[str] = []
    row = job(dl, "a", 16)
    row.future.add_done_callback(lambda _: order.append("row"))
    engine.submit(row)

    def learn():
        order.append("learn")
        for _ in range(4):
            dl.agent("a").learn(PROMPTS["a"], " return 42")

    learned = engine.call(learn, durable=False, waits_for=frozenset({"a"}))
    engine.start()
    try:
        completion = row.future.result(timeout=120)
        learned.result(timeout=120)
    finally:
        engine.stop()
    assert order == ["row", "learn"]
    assert completion.token_ids == before
    assert alone(dl, "a", 16) != before  # the learn changed a's output: the row did not see it


def test_text_stream_holds_back_what_may_still_change():
    stream = TextStream(lambda ids: "".join(chr(i) for i in ids), ("STOP",))
    text, stopped = stream.update([ord(c) for c in "ab S"])
    assert not stopped and stream.ready(text, final=False) == "ab "  # "S" may begin "STOP"
    text, stopped = stream.update([ord(c) for c in "ab Sx\ufffd"])
    assert stream.ready(text, final=False) == "Sx"  # an incomplete character waits
    text, stopped = stream.update([ord(c) for c in "ab Sxy STOP and more"])
    assert stopped and text == "ab Sxy " and stream.ready(text, final=True) == "y "


@pytest.fixture
def served(tmp_path):
    dl = make_dl()
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN)
    with live(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        headers = register(http, "alice")
        yield http, headers, app.state.service.engine, dl


def events(lines) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_streamed_chunks_arrive_while_decoding_and_join_to_the_whole_text(served):
    http, headers, engine, dl = served
    dl.config.generation.stop_at_eos = False
    body = {"model": "alice", "prompt": "def parse(text):", "max_tokens": 48}
    whole = http.post("/v1/completions", json=body, headers=headers).json()["choices"][0]["text"]
    gate, first_seen = threading.Event(), threading.Event()
    step = engine.scheduler.step

    def held_step():  # after the first piece is out, the engine waits until the client has it
        if first_seen.is_set() and not gate.is_set():
            gate.wait(30)
        step()

    engine.scheduler.step = held_step
    steps_at_first = None
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if steps_at_first is None and line.startswith("data: {"):
                steps_at_first = engine.scheduler.stats["steps"]
                first_seen.set()
                gate.set()
    chunks = events(lines)
    assert steps_at_first is not None and steps_at_first < engine.scheduler.stats["steps"]
    assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_that_leaves_frees_its_row(served):
    http, headers, engine, dl = served
    dl.config.generation.stop_at_eos = False
    step = engine.scheduler.step
    left = threading.Event()

    def held_step():  # the row keeps decoding slowly until the client has gone
        if not left.is_set():
            left.wait(0.05)
        step()

    engine.scheduler.step = held_step
    body = {"model": "alice", "prompt": "def parse(text):", "max_tokens": 200, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the client reads one piece and goes away
    left.set()
    for _ in range(600):
        if engine.scheduler.stats["cancelled"] and not engine.scheduler.rows:
            break
        threading.Event().wait(0.05)
    assert engine.scheduler.stats["cancelled"] == 1 and not engine.scheduler.rows
    assert engine.scheduler.stats["tokens"] < 200  # it left long before its max_tokens
    r = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4}, headers=headers)
    assert r.status_code == 200  # the server goes on


def test_logprobs_are_the_models_on_the_same_tokens(tmp_path):
    dl = make_dl()
    populate(dl, {"alice": ("s", "d")}, per_scope=1)
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN)
    with TestClient(app) as client:
        key = client.app.state.service.keys.issue("alice")
        headers = {"Authorization": f"Bearer {key}"}
        prompt = "def parse(text):"
        body = {"model": "alice", "prompt": prompt, "max_tokens": 6, "logprobs": 3}
        r = client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        ids = dl.encode(prompt)
        generated = dl.generate_batch([("alice", prompt)], max_new_tokens=6)[0].token_ids  # greedy: the same tokens
        assert dl.tokenizer.decode(generated, skip_special_tokens=True) == choice["text"]
        assert len(choice["logprobs"]["token_logprobs"]) == len(generated)
        full = torch.tensor([ids + generated[:6]])
        logp = dl.agent("alice").logits(full, route_tokens=len(ids))[0].float().log_softmax(-1)
        for i, (lp, top) in enumerate(zip(choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"])):
            position = len(ids) - 1 + i
            assert lp == pytest.approx(float(logp[position, full[0, position + 1]]), abs=1e-4)
            assert len(top) == 3 and max(top.values()) == pytest.approx(float(logp[position].max()), abs=1e-4)
        # echo with max_tokens 0 scores the prompt, as legacy completions do
        r = client.post(
            "/v1/completions",
            json={"model": "alice", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
            headers=headers,
        )
        scored = r.json()["choices"][0]
        prompt_logp = dl.agent("alice").logits(torch.tensor([ids]))[0].float().log_softmax(-1)
        assert scored["text"] == dl.tokenizer.decode(ids) and scored["logprobs"]["token_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert scored["logprobs"]["token_logprobs"][i] == pytest.approx(
                float(prompt_logp[i - 1, ids[i]]), abs=1e-4
            )
        # several prompts in one request: one choice each
        r = client.post(
            "/v1/completions", json={"model": "alice", "prompt": [ids, ids[:3]], "max_tokens": 2}, headers=headers
        )
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_a_prompt_the_cache_has_only_a_semantic_candidate_for_is_served_once_and_right():
    """With entries cached, a new prompt goes through semantic lookup (WaveGen serves it, verified or decoded
    itself, even when no candidate is near enough); the scheduler must take that result as it is, not close it
    again as a miss of its own (lm-evaluation-harness found this: a 500)."""
    from dynamiclora import DynamicLoRAConfig
    from dynamiclora.wavegen.signature import sampling_key

    wavegen = {"min_coherence": 0.0, "learn_from_generations": False}
    dl = make_dl(config=DynamicLoRAConfig(wavegen=wavegen, dynamics={"tick_interval": 0}))
    dl.agent("a", swarm="s1", domain="d1")
    dl.agent("a").generate(PROMPTS["a"], max_new_tokens=6)  # a cached entry: semantic lookup has candidates
    cfg = replace(dl.config.generation, max_new_tokens=6)
    request = dl.wavegen.open(0, "a", dl.encode(PROMPTS["b"]), cfg, sampling_key(cfg))
    assert request.entry is None and dl.wavegen.cache.has_semantic(request.provenances)
    expected = dl.agent("a").generate(PROMPTS["b"], max_new_tokens=6, use_cache=False).token_ids
    done: list[Completion] = []
    sched = Scheduler(dl.runtime, dl.wavegen, use_cache=True, on_finished=lambda j, c: done.append(c))
    sched.admit([GenerateJob("a", PROMPTS["b"], dl.encode(PROMPTS["b"]), 6)])
    while sched.rows:
        sched.step()
    assert len(done) == 1 and done[0].token_ids == expected
