"""The server: the official openai client, key isolation, batching, back-pressure, bad input (examples and
property-based fuzzing: never a 5xx), durability under SIGKILL, and the dashboard in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dynamiclora import DynamicLoRA
from dynamiclora.server import create_app
from dynamiclora.server.engine import CallJob
from dynamiclora.server.launch import spawn

from .conftest import make_dl
from .server_util import ADMIN, ADMIN_HEADERS, free_port, live, register

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def server(tmp_path):
    dl = make_dl()
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN, batch_wait_s=0.05)
    with TestClient(app) as client:
        yield client, dl, tmp_path / "state"


# -- the official client ----------------------------------------------------------------------------------
def test_the_openai_client_works_unchanged(tmp_path):
    openai = pytest.importorskip("openai")
    dl = make_dl()
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN)
    with live(app) as url:
        with httpx.Client(base_url=url) as http:
            headers = register(http, "alice")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1])
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"base", "alice"} and models["alice"].parent == "base"
        done = client.completions.create(model="alice", prompt="def parse(text):", max_tokens=8)
        assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 8
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        pieces = list(client.completions.create(model="alice", prompt="def parse(text):", max_tokens=8, stream=True))
        assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text  # greedy: the same text
        assert pieces[-1].choices[0].finish_reason == done.choices[0].finish_reason
        base = client.completions.create(model="base", prompt="def parse(text):", max_tokens=8)
        assert base.choices[0].text  # the base model alone, under alice's key
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nobody", prompt="x", max_tokens=2)


def test_chat_needs_a_chat_template(server):
    client, _, _ = server
    headers = register(client, "alice")
    r = client.post(
        "/v1/chat/completions",
        json={"model": "alice", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_chat_completions_with_a_template(server, monkeypatch):
    client, dl, _ = server
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    monkeypatch.setattr(dl.tokenizer, "chat_template", template, raising=False)  # the tiny tokenizer is shared
    headers = register(client, "alice")
    body = {"model": "alice", "messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 4}
    r = client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant" and r.json()["usage"]["completion_tokens"] <= 4
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == r.json()["choices"][0]["message"]["content"] and streamed.rstrip().endswith("data: [DONE]")


# -- keys ----------------------------------------------------------------------------------------------
def test_keys_isolate_agents(server):
    client, dl, _ = server
    alice, bob = register(client, "alice"), register(client, "bob")
    client.post("/v1/learn", json={"model": "bob", "prompt": "def g(y):", "completion": " return y"}, headers=bob)
    bob_hash = dl.snapshot("bob").provenance_hash
    gen = {"model": "bob", "prompt": "def g(y):", "max_tokens": 3}
    learn = {"model": "bob", "prompt": "def g(y):", "completion": " return -y"}
    assert client.post("/v1/completions", json=gen, headers=alice).status_code == 403
    assert client.post("/v1/learn", json=learn, headers=alice).status_code == 403
    assert client.get("/v1/circuits", params={"agent": "bob"}, headers=alice).status_code == 403
    assert client.post("/v1/learn", json=learn).status_code == 401
    assert client.post("/v1/learn", json=learn, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v1/tick", headers=alice).status_code == 403
    assert client.post("/v1/agents", json={"id": "eve"}, headers=alice).status_code == 403
    assert dl.snapshot("bob").provenance_hash == bob_hash and "eve" not in dl.hierarchy.agents
    mine = client.get("/v1/circuits", headers=alice).json()["data"]
    assert all(c["scope"] != "bob" for c in mine)
    assert client.post("/v1/completions", json=gen, headers=bob).status_code == 200
    assert client.post("/v1/tick", headers=ADMIN_HEADERS).status_code == 200
    assert client.post("/v1/agents", json={"id": "alice"}, headers=ADMIN_HEADERS).status_code == 409


def test_learning_through_the_api_changes_only_the_learners_context_and_is_saved(server):
    client, dl, state = server
    alice = register(client, "alice")
    register(client, "bob")
    before = {k: s.content_hash() for k, s in dl.hierarchy.scopes.items()}
    r = client.post(
        "/v1/learn", json={"model": "alice", "prompt": "def f(x):", "completion": " return x"}, headers=alice
    )
    assert r.status_code == 200 and r.json()["saved"]
    changed = {str(k) for k, s in dl.hierarchy.scopes.items() if before.get(k) != s.content_hash()}
    assert changed == {"context:alice"}
    again = DynamicLoRA.load(state, model=make_dl().model, tokenizer=dl.tokenizer)
    assert r.json()["circuit"] in {c["id"] for c in again.circuits(agent="alice")}


# -- batching and back-pressure ----------------------------------------------------------------------------
def test_concurrent_agents_share_one_batched_forward_with_unchanged_outputs(server):
    client, dl, _ = server
    agents = [f"a{i}" for i in range(4)]
    headers = {a: register(client, a) for a in agents}
    for i, a in enumerate(agents):
        client.post("/v1/learn", json={"model": a, "prompt": "x =", "completion": f" {i}"}, headers=headers[a])
    bodies = {a: {"model": a, "prompt": "x =", "max_tokens": 6} for a in agents}
    alone = {a: dl.generate_batch([(a, "x =")], max_new_tokens=6)[0].text for a in agents}  # (the engine is idle)
    engine = client.app.state.service.engine
    rows = engine.stats["rows"]
    engine.scheduler.stats["peak_rows"] = 0
    with ThreadPoolExecutor(len(agents)) as pool:
        together = dict(
            zip(
                agents,
                pool.map(lambda a: client.post("/v1/completions", json=bodies[a], headers=headers[a]).json(), agents),
            )
        )
    assert engine.stats["rows"] - rows == len(agents) and engine.scheduler.stats["peak_rows"] > 1
    for a in agents:  # a row of a heterogeneous batch gets what it got alone
        assert together[a]["choices"][0]["text"] == alone[a]


def test_a_full_queue_answers_429_and_the_server_recovers(tmp_path):
    dl = make_dl()
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN, max_queue=1)
    with TestClient(app) as client:
        headers = register(client, "alice")
        engine = client.app.state.service.engine
        release = threading.Event()
        engine.submit(CallJob(lambda: release.wait(30), durable=False))  # occupies the worker
        time.sleep(0.2)
        engine.submit(CallJob(lambda: None, durable=False))  # fills the one queue slot
        r = client.post("/v1/completions", json={"model": "alice", "prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        release.set()
        time.sleep(0.2)
        r = client.post("/v1/completions", json={"model": "alice", "prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 200


# -- bad input ---------------------------------------------------------------------------------------------
TURN = {"role": "user", "content": "x"}
BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b'{"model": "alice", "prompt": "\xff\xfe"}', None),
    ("/v1/completions", '{"model": "alice", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "alice", "prompt": ""}', "prompt"),
    ("/v1/completions", json.dumps({"model": "alice", "prompt": "x" * 40_000}), "prompt"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "max_tokens": 100000}', "max_tokens"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "max_tokens": 1000}', "max_tokens"),  # > context
    ("/v1/completions", '{"model": "alice", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "temperature": -1}', "temperature"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "n": 3}', "n"),
    ("/v1/completions", '{"model": "nobody", "prompt": "x"}', "model"),
    ("/v1/completions", '{"model": 5, "prompt": "x"}', "model"),
    ("/v1/completions", '{"prompt": "x"}', "model"),
    ("/v1/completions", "[]", "body"),
    ("/v1/learn", '{"model": "alice", "prompt": "x"}', "completion"),
    ("/v1/learn", '{"model": "alice", "prompt": "x", "completion": 7}', "completion"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "logprobs": 21}', "logprobs"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "logprobs": -1}', "logprobs"),
    ("/v1/chat/completions", json.dumps({"model": "alice", "messages": [TURN], "max_tokens": 0}), "max_tokens"),
    ("/v1/learn", '{"model": "alice", "prompt": null, "completion": "y"}', "prompt"),  # absent, or text
    ("/v1/learn", json.dumps({"model": "alice", "prompt": "x", "messages": [TURN], "completion": "y"}), "body"),
    ("/v1/completions", '{"model": "alice", "prompt": "x", "echo": true, "stream": true}', "stream"),
    ("/v1/completions", '{"model": "alice", "prompt": [5, 99999999]}', "prompt"),
    ("/v1/completions", '{"model": "alice", "prompt": [[5], [99999999]]}', "prompt"),
    (
        "/v1/chat/completions",
        '{"model": "alice", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
        "top_logprobs",
    ),
    ("/v1/chat/completions", '{"model": "alice", "messages": []}', "messages"),
    ("/v1/chat/completions", '{"model": "alice", "messages": [{"role": "robot", "content": "x"}]}', "messages"),
]


@pytest.mark.parametrize("path, body, field", BAD)
def test_bad_input_gets_a_4xx_naming_the_field(server, path, body, field):
    client, _, _ = server
    headers = register(client, "alice")
    r = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"]
    if field:
        assert error["param"] is None or error["param"].startswith(field), error
        assert field in error["message"] or error["param"].startswith(field), error
    assert client.get("/health").json()["status"] == "ok"


def test_fuzzing_every_endpoint_never_gives_a_5xx(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client, _, _ = server
    agent = register(client, "alice")
    scalars = (
        st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=40)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=6,
    )
    fields = [
        "model",
        "prompt",
        "completion",
        "max_tokens",
        "temperature",
        "top_p",
        "stream",
        "stop",
        "n",
        "messages",
        "critical",
        "id",
        "swarm",
        "domain",
        "max_completion_tokens",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "echo",
        "accepted",
        "correction",
        "seed",
    ]
    plausible = {
        "model": st.sampled_from(["alice", "base", "bob", ""]) | values,
        "max_tokens": st.integers(-5, 40) | values,
        "prompt": st.text(max_size=30) | values,
    }
    body = st.fixed_dictionaries({}, optional={f: plausible.get(f, values) for f in fields})
    routes = [
        ("post", "/v1/completions"),
        ("post", "/v1/chat/completions"),
        ("post", "/v1/learn"),
        ("post", "/v1/feedback"),
        ("post", "/v1/forget"),
        ("post", "/v1/agents"),
        ("post", "/v1/tick"),
        ("get", "/v1/models"),
        ("get", "/v1/circuits"),
        ("get", "/v1/migrations"),
        ("get", "/v1/timescales"),
        ("get", "/v1/cache"),
    ]
    keys = st.sampled_from([agent, ADMIN_HEADERS, {}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}])
    documented = {
        (method, path): set(operation["responses"])
        for path, operations in client.get("/openapi.json").json()["paths"].items()
        for method, operation in operations.items()
    }

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        route=st.sampled_from(routes),
        payload=body | values,
        raw=st.binary(max_size=30),
        use_raw=st.booleans(),
        headers=keys,
    )
    def fuzz(route, payload, raw, use_raw, headers):
        method, path = route
        if method == "get":
            r = client.get(path, headers=headers, params={"agent": str(payload)[:20]} if use_raw else None)
        else:
            content = raw if use_raw else json.dumps(payload)
            r = client.post(path, content=content, headers={**headers, "Content-Type": "application/json"})
        assert r.status_code < 500, (method, path, payload, r.status_code, r.text)
        assert str(r.status_code) in documented[(method, path)], (method, path, r.status_code, r.text)  # as served

    fuzz()
    assert client.get("/health").json()["status"] == "ok"


def reload(state: Path) -> DynamicLoRA:
    """The saved state on a fresh copy of the fixture's tiny model (the same weights: make_dl's seed)."""
    from dynamiclora.testing import tiny_model

    model, tokenizer = tiny_model("llama")
    return DynamicLoRA.load(state, model=model, tokenizer=tokenizer)


# -- feedback ------------------------------------------------------------------------------------------------
def test_feedback_learns_a_confirmed_or_corrected_completion_into_its_agent_only(server):
    client, dl, state = server
    alice, bob = register(client, "alice"), register(client, "bob")
    ask = {"model": "alice", "prompt": "def version():", "max_tokens": 8}
    first = client.post("/v1/completions", json=ask, headers=alice).json()
    bob_before = dl.generate_batch([("bob", "def version():")], max_new_tokens=8)[0].text
    # another agent's key, an unknown id, no verdict: 4xx naming the field, nothing learned
    for body, headers, code in (
        ({"id": first["id"], "correction": " return 1"}, bob, 403),
        ({"id": "cmpl-nope", "accepted": True}, alice, 404),
        ({"id": first["id"]}, alice, 400),
        ({"id": first["id"], "accepted": True, "correction": " return 1"}, alice, 400),
        ({"id": first["id"], "accepted": False}, alice, 400),
    ):
        r = client.post("/v1/feedback", json=body, headers=headers)
        assert r.status_code == code and r.json()["error"]["param"] in ("id", "accepted", "body"), r.text
    assert not dl.circuits(agent="alice") or all(c["tier"] != "context" for c in dl.circuits(agent="alice"))
    corrected = None
    for _ in range(12):  # corrected until alice gives the right reply herself
        r = client.post("/v1/feedback", json={"id": first["id"], "correction": " return '2.1'"}, headers=alice)
        assert r.status_code == 200 and r.json()["feedback"] == "corrected" and r.json()["saved"]
        corrected = client.post("/v1/completions", json=ask, headers=alice).json()["choices"][0]["text"]
        if corrected.startswith(" return '2.1'"):
            break
    assert corrected.startswith(" return '2.1'")
    assert dl.generate_batch([("bob", "def version():")], max_new_tokens=8)[0].text == bob_before  # alice's only
    assert r.json()["circuit"] in {c["id"] for c in reload(state).circuits(agent="alice")}  # durable
    # accepting a reply learns it as it was given
    again = client.post("/v1/completions", json=ask, headers=alice).json()
    r = client.post("/v1/feedback", json={"id": again["id"], "accepted": True}, headers=alice)
    assert r.status_code == 200 and r.json()["feedback"] == "accepted"


# -- durability ----------------------------------------------------------------------------------------------
def _start(state: Path, model_dir: Path, port: int) -> subprocess.Popen:
    return spawn(state, model_dir, port, ADMIN, timeout_s=120)


def test_sigkill_during_learning_and_feedback_loses_nothing_acknowledged(tmp_path):
    from dynamiclora.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    state, port = tmp_path / "state", free_port()
    proc = _start(state, model_dir, port)
    url = f"http://127.0.0.1:{port}"
    acknowledged: list[dict] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            headers = register(http, "alice")
            stop = threading.Event()

            def learner():  # learns and feedback (a correction of a completion), alternately
                i = 0
                while not stop.is_set():
                    body = {"model": "alice", "prompt": f"def f{i}(x):", "completion": f" return x + {i}"}
                    try:
                        if i % 2:
                            prompt = {"model": "alice", "prompt": body["prompt"], "max_tokens": 2}
                            done = http.post("/v1/completions", json=prompt, headers=headers).json()
                            fix = {"id": done["id"], "correction": body["completion"]}
                            r = http.post("/v1/feedback", json=fix, headers=headers)
                        else:
                            r = http.post("/v1/learn", json=body, headers=headers)
                    except httpx.HTTPError:
                        return  # killed mid-request: not acknowledged
                    if r.status_code == 200:
                        acknowledged.append(r.json())
                    i += 1

            thread = threading.Thread(target=learner)
            thread.start()
            while len(acknowledged) < 6:
                time.sleep(0.05)
            time.sleep(0.13)  # somewhere inside a learn or a save
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            thread.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    again = DynamicLoRA.load(state)
    assert again.interactions >= max(a["interaction"] for a in acknowledged)
    kept = {c["id"] for c in again.circuits(agent="alice")}
    assert {a["circuit"] for a in acknowledged} <= kept
    assert any(a.get("feedback") == "corrected" for a in acknowledged)
    proc = _start(state, model_dir, port)  # and the server resumes from it
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["agents"] == 1 and health["interactions"] >= len(acknowledged)
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "alice", "prompt": "def f0(x):", "max_tokens": 3}, headers=headers
        )
        assert r.status_code == 200  # alice's key survived too
    finally:
        proc.kill()
        proc.wait()


def test_an_acknowledged_deletion_survives_sigkill(tmp_path):
    from dynamiclora.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    state, port = tmp_path / "state", free_port()
    proc = _start(state, model_dir, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            keys = {a: register(http, a) for a in ("alice", "bob")}
            for a, headers in keys.items():
                body = {"model": a, "prompt": "def owner():", "completion": f" return '{a}'"}
                assert http.post("/v1/learn", json=body, headers=headers).status_code == 200
            assert http.delete("/v1/agents/alice", headers=keys["alice"]).status_code == 200
            body = {"model": "bob", "prompt": "class Owner:", "completion": " name = 'bob'"}
            assert http.post("/v1/learn", json=body, headers=keys["bob"]).status_code == 200
            forgot = http.post("/v1/forget", json={"model": "bob", "prompt": "class Owner:"}, headers=keys["bob"])
            assert forgot.status_code == 200 and forgot.json()["keys_removed"] >= 1, forgot.text
            proc.send_signal(signal.SIGKILL)  # at once after the answer
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    again = DynamicLoRA.load(state)
    assert "alice" not in again.hierarchy.agents and again.circuits(scope="context:bob")
    assert not [k for k in again.hierarchy.scopes if k.name == "alice"]
    feature = again.router.features([again.encode("class Owner:")])[0]  # bob's forgetting was kept too
    assert not [c for c in again.hierarchy.all_circuits() if c.gate is not None and c.gate.distance(feature) <= 1]


# -- the dashboard ----------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_dashboard_renders_its_plots_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("DYNAMICLORA_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    dl = make_dl()
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN)
    with live(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        headers = register(http, "alice")
        for i in range(3):
            http.post("/v1/learn", json={"model": "alice", "prompt": "x =", "completion": f" {i}"}, headers=headers)
            http.post("/v1/completions", json={"model": "alice", "prompt": "x =", "max_tokens": 3}, headers=headers)
            http.post("/v1/tick", headers=ADMIN_HEADERS)
        page = f"{url}/?key={ADMIN}"
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path}/c",
            "--virtual-time-budget=15000",
            "--enable-logging=stderr",
            "--v=0",
        ]
        dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
        assert "plots loaded: 4 errors: 0" in dom.stdout, (dom.stdout[-2000:], dom.stderr[-2000:])
        console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line]
        assert not console_errors, console_errors
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        subprocess.run(
            [browser, *flags, "--window-size=1200,1000", f"--screenshot={shot}", page],
            capture_output=True,
            timeout=120,
        )
        assert shot.exists() and shot.stat().st_size > 10_000


def test_learning_from_a_conversation_over_http(server, monkeypatch):
    client, dl, _ = server
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    monkeypatch.setattr(dl.tokenizer, "chat_template", template, raising=False)  # the tiny tokenizer is shared
    headers = register(client, "alice")
    body = {"model": "alice", "messages": [{"role": "user", "content": "parse json"}], "completion": " loads"}
    r = client.post("/v1/learn", json=body, headers=headers)
    assert r.status_code == 200 and r.json()["spawned"], r.text
    r = client.post("/v1/learn", json={**body, "prompt": "also text"}, headers=headers)
    assert r.status_code == 400 and "exactly one of" in r.json()["error"]["message"]


def test_the_readmes_curl_command_works_as_written(server):
    """curl -d sends a form content type by default; the body is JSON all the same."""
    client, _, _ = server
    body = '{"id": "ana", "swarm": "json-team"}'
    form = {**ADMIN_HEADERS, "Content-Type": "application/x-www-form-urlencoded"}
    r = client.post("/v1/agents", content=body, headers=form)
    assert r.status_code == 201, r.text
    r = client.post("/v1/agents", content=b"id=bob", headers=form)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


# -- forgetting on request ---------------------------------------------------------------------------------------
def test_a_deleted_agent_leaves_no_key_tier_cache_entry_or_completion_behind(server):
    client, dl, state = server
    dl.config.wavegen.min_coherence = 0.0  # every miss is stored, however unsure the tiny model is
    alice, bob = register(client, "alice"), register(client, "bob")
    for who, headers in (("alice", alice), ("bob", bob)):
        body = {"model": who, "prompt": "def owner():", "completion": f" return '{who}'"}
        assert client.post("/v1/learn", json=body, headers=headers).status_code == 200
        for _ in range(2):  # a miss stored, then a hit: each agent has a cache entry
            client.post("/v1/completions", json={"model": who, "prompt": "x =", "max_tokens": 4}, headers=headers)
    assert any(e.agent == "alice" for e in dl.wavegen.cache.entries())
    bob_before = dl.generate_batch([("bob", "def owner():")], max_new_tokens=6)[0].text
    assert client.delete("/v1/agents/alice", headers=bob).status_code == 403  # another agent's key
    r = client.delete("/v1/agents/alice", headers=alice)
    assert r.status_code == 200 and r.json()["deleted"] and r.json()["circuits"] >= 1, r.text
    assert client.get("/v1/models", headers=alice).status_code == 401  # its key is gone
    assert "alice" not in dl.hierarchy.agents and not client.app.state.service.keys.has_key("alice")
    assert not [k for k in dl.hierarchy.scopes if k.name == "alice" and k.tier in ("agent", "context")]
    assert not [e for e in dl.wavegen.cache.entries() if e.agent == "alice"]
    assert all("alice" not in [w[0] for w in who] for who in dl.wavegen.cache.requesters.values())
    assert dl.generate_batch([("bob", "def owner():")], max_new_tokens=6)[0].text == bob_before  # bob unchanged
    again = reload(state)  # durable: the saved state has forgotten her too
    assert "alice" not in again.hierarchy.agents
    assert not [e for e in again.wavegen.cache.entries() if e.agent == "alice"]
    assert "bob" in again.hierarchy.agents and again.circuits(agent="bob")
    assert client.delete("/v1/agents/alice", headers=ADMIN_HEADERS).status_code == 404
    # registering the id again starts from nothing
    fresh = register(client, "alice")
    assert client.get("/v1/circuits", headers=fresh).json()["data"] == []


def test_an_agent_removes_one_of_its_circuits_but_not_a_shared_one(server):
    client, dl, _ = server
    alice = register(client, "alice")
    body = {"model": "alice", "prompt": "def owner():", "completion": " return 'alice'"}
    circuit = client.post("/v1/learn", json=body, headers=alice).json()["circuit"]
    import torch

    from .conftest import random_circuit

    shared = dl.add_circuit("swarm:team", random_circuit(dl, 2, torch.Generator().manual_seed(0)))
    assert client.delete(f"/v1/circuits/{shared.id}", headers=alice).status_code == 403
    assert client.delete("/v1/circuits/nope", headers=alice).status_code == 404
    r = client.delete(f"/v1/circuits/{circuit}", headers=alice)
    assert r.status_code == 200 and r.json()["scope"] == "context:alice"
    assert circuit not in {c["id"] for c in dl.circuits(agent="alice")}


def test_learn_exchanges_learns_a_reply_finished_by_itself_before_answering(tmp_path):
    dl = make_dl()
    state = tmp_path / "state"
    app = create_app(dl, state, admin_key=ADMIN, batch_wait_s=0.01, learn_exchanges=True)
    with TestClient(app) as client:
        alice = register(client, "alice")
        ask = {"model": "alice", "prompt": "def version():", "max_tokens": 6}
        sampled = {**ask, "temperature": 1.0, "seed": 3}
        first = client.post("/v1/completions", json=sampled, headers=alice).json()
        assert first["choices"][0]["finish_reason"] == "length" and first["learned"] == [None]  # cut short: not
        assert not dl.circuits(agent="alice")
        text = first["choices"][0]["text"]
        stop = text[-2:]
        reply = text[: text.index(stop)]
        assert reply.strip(), text
        greedy = client.post("/v1/completions", json=ask, headers=alice).json()["choices"][0]["text"]
        assert not greedy.startswith(reply), (greedy, reply)  # what it learns is new to it
        done = client.post("/v1/completions", json={**sampled, "stop": [stop]}, headers=alice).json()
        assert done["choices"][0] == {"index": 0, "text": reply, "finish_reason": "stop", "logprobs": None}
        learned = done["learned"][0]
        assert learned["agent"] == "alice" and learned["trained"] and learned["saved"]
        again = client.post("/v1/completions", json=ask, headers=alice).json()["choices"][0]["text"]
        assert again.startswith(reply), (again, reply)  # the agent now says what it said
    assert learned["circuit"] in {c["id"] for c in reload(state).circuits(agent="alice")}  # saved before the answer


def test_forgetting_a_prompt_over_http_reverts_the_agent_on_it(server):
    client, dl, state = server
    alice, bob = register(client, "alice"), register(client, "bob")
    ask = {"model": "alice", "prompt": "def alpha_port():", "max_tokens": 6}
    before = client.post("/v1/completions", json=ask, headers=alice).json()["choices"][0]["text"]
    for _ in range(8):
        body = {"model": "alice", "prompt": ask["prompt"], "completion": " return 7311"}
        assert client.post("/v1/learn", json=body, headers=alice).status_code == 200
        if client.post("/v1/completions", json=ask, headers=alice).json()["choices"][0]["text"] != before:
            break
    forget = {"model": "alice", "prompt": ask["prompt"]}
    r = client.post("/v1/forget", json=forget, headers=bob)  # another agent's key: refused, nothing changes
    assert r.status_code == 403, r.text
    r = client.post("/v1/forget", json=forget, headers=alice)
    assert r.status_code == 200 and r.json()["keys_removed"] >= 1 and r.json()["saved"], r.text
    assert client.post("/v1/completions", json=ask, headers=alice).json()["choices"][0]["text"] == before
    assert not reload(state).circuits(scope="context:alice")
