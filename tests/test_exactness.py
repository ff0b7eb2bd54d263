"""The exactness contract: an agent's output is a function of the base model, the prompt, the sampling settings and
the content its snapshot names. Served outputs equal uncached decoding; no other agent's learning, no batch-mate,
no idle tick moves an output without moving the hash."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from dynamiclora import DynamicLoRA, DynamicLoRAConfig, GenerationConfig
from dynamiclora.errors import DynamicLoRAError
from dynamiclora.testing import tiny_model

from .conftest import make_dl, populate, random_circuit
from .server_util import ADMIN, ADMIN_HEADERS

FACTS = [
    ("def get_alpha_port():", " return 'cedar'"),
    ("def get_bravo_level():", " return 'onyx'"),
    ("def get_delta_owner():", " return 'maple'"),
]
OTHERS = ["import os\nprint(os.getcwd())", "class Stack:\n    pass", "for i in range(3):", "def parse(text):"]
OPEN = {"min_coherence": 0.0, "learn_from_generations": False}
# small rewrites of a prompt: their route distances spread over about 0.8 to 2.8 radii, so any change of how
# distances are measured moves some of them across a gate's boundary
EDITS = [
    lambda p: p + " ",
    lambda p: p + "\n",
    lambda p: p.replace("():", "( ):"),
    lambda p: p.replace("get_", "get"),
    lambda p: "# getter\n" + p,
    lambda p: p[:-1],
    lambda p: p + " pass",
    lambda p: p.replace("def", "async def"),
]
NEAR = [edit(p) for p, _ in FACTS for edit in EDITS]


def scored(agent, prompt: str) -> torch.Tensor:
    ids = agent.dl.encode(prompt)
    return agent.logits(torch.tensor([ids]), route_tokens=len(ids))


def uncached(dl: DynamicLoRA, agent_id: str, prompt: str, n: int = 6) -> list[int]:
    """Greedy decoding under the stack as it is now, without the cache (and without counting as a request)."""
    return dl.generate_ids([agent_id], [dl.encode(prompt)], GenerationConfig(max_new_tokens=n))[0].tokens[0]


# -- isolation: another agent's learning -------------------------------------------------------------------------
def test_another_agents_learning_moves_neither_an_agents_outputs_nor_its_hash():
    dl = make_dl()
    alice, bob = dl.agent("alice", swarm="s1", domain="d1"), dl.agent("bob", swarm="s2", domain="d2")
    for p, c in FACTS[:2]:
        for _ in range(2):
            alice.learn(p, c)
    probes = [p for p, _ in FACTS] + NEAR + OTHERS
    before = {p: scored(alice, p) for p in probes}
    digest = alice.snapshot().provenance_hash
    for i in range(6):  # bob learns prompts far from alice's and near them
        bob.learn(f"def get_bob_{i}():" if i % 2 else OTHERS[i % len(OTHERS)] + f" # {i}", f" return {i}")
    assert alice.snapshot().provenance_hash == digest
    for p in probes:
        torch.testing.assert_close(scored(alice, p), before[p], rtol=0, atol=0)


# -- the cache holds what the stack up to its tier produces ---------------------------------------------------------
def test_a_teammate_is_never_served_another_agents_personal_output():
    dl = make_dl(config=DynamicLoRAConfig(wavegen=OPEN, dynamics={"tick_interval": 0}))
    alice, bob = dl.agent("alice", swarm="team", domain="d"), dl.agent("bob", swarm="team", domain="d")
    dl.add_circuit("agent:alice", random_circuit(dl, 4, torch.Generator().manual_seed(5), magnitude=0.4))
    prompt = "def parse(text):"
    assert uncached(dl, "alice", prompt) != uncached(dl, "bob", prompt)  # alice's own tier changes what she says
    for _ in range(3):  # both ask: universality would put the prompt into the swarm cache
        for agent in (alice, bob):
            r = agent.generate(prompt, max_new_tokens=6, mode="jump")
            assert r.token_ids == uncached(dl, agent.id, prompt), (agent.id, r.cache)
    served = {r.cache for r in (bob.generate(prompt, max_new_tokens=6, mode="jump") for _ in range(2))}
    assert served == {"swarm"}  # bob's own output, from the shared tier his stack and alice's agree on


def test_jump_verifies_when_a_faster_tier_acts_on_the_prompt():
    dl = make_dl(config=DynamicLoRAConfig(wavegen=OPEN, dynamics={"tick_interval": 0}))
    alice = dl.agent("alice", swarm="team", domain="d")
    prompt = "def parse(text):"
    alice.generate(prompt, max_new_tokens=6)  # stored at the agent tier: nothing acts on the prompt yet
    for _ in range(3):
        alice.learn(prompt, " return json")  # a context circuit now acts on exactly this prompt
    r = alice.generate(prompt, max_new_tokens=6, mode="jump")
    assert r.token_ids == uncached(dl, "alice", prompt) and r.cache == "agent"
    assert r.draft_tokens and r.accepted_tokens < r.draft_tokens  # verified, not jumped: the draft was cut


# -- idle ticks -----------------------------------------------------------------------------------------------------
def test_an_imported_adapter_and_the_cache_outlive_a_thousand_idle_ticks():
    dl = make_dl(config=DynamicLoRAConfig(wavegen=OPEN, dynamics={"tick_interval": 0}))
    alice = dl.agent("alice", swarm="s", domain="d")
    imported = dl.add_circuit("foundation", random_circuit(dl, 4, torch.Generator().manual_seed(1), magnitude=0.2))
    for p in OTHERS:
        alice.generate(p, max_new_tokens=4)
    entries, digest = {e.id for e in dl.wavegen.cache.entries()}, alice.snapshot().provenance_hash
    for _ in range(1000):
        dl.tick()
    assert imported.id in {c["id"] for c in dl.circuits(tier="foundation")} and not dl.forgotten()
    assert alice.snapshot().provenance_hash == digest
    assert {e.id for e in dl.wavegen.cache.entries()} == entries
    assert [alice.generate(p, max_new_tokens=4, mode="jump").cache for p in OTHERS] == ["agent"] * len(OTHERS)
    dl.remove_circuit(imported.id)  # only its owner removes it
    assert not dl.circuits(tier="foundation")


def test_decay_changes_content_in_steps_not_on_every_idle_tick():
    dl = make_dl(config=DynamicLoRAConfig(dynamics={"tick_interval": 0}))
    alice = dl.agent("alice", swarm="s", domain="d")
    alice.learn(*FACTS[0])
    hashes, ticks = [alice.snapshot().provenance_hash], 0
    while dl.circuits(tier="context"):
        dl.tick()
        ticks += 1
        hashes.append(alice.snapshot().provenance_hash)
    changes = sum(a != b for a, b in zip(hashes, hashes[1:]))
    assert ticks >= 20 and changes <= ticks // 3, (ticks, changes)  # forgotten in the end, in a few steps
    assert dl.forgotten()[-1]["tier"] == "context"


# -- batch-mates --------------------------------------------------------------------------------------------------
def batch_team(dtype: torch.dtype) -> DynamicLoRA:
    model, tokenizer = tiny_model("llama")
    dl = DynamicLoRA(model.to(dtype), tokenizer)
    populate(dl, {"alice": ("s1", "d1"), "carol": ("s1", "d1"), "bob": ("s2", "d2")}, per_scope=2, rank=4)
    alice = dl.agent("alice")
    for _ in range(2):
        alice.learn(*FACTS[0])  # a gated circuit that acts on one row only
    return dl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_output_does_not_depend_on_its_batch_mates(dtype):
    dl = batch_team(dtype)
    ids = [dl.encode(FACTS[0][0]), dl.encode(FACTS[1][0])]
    n = min(map(len, ids))
    ids = torch.tensor([i[:n] for i in ids])  # equal lengths: no padding, only the batch-mates differ
    alone = dl.forward(["alice"], ids[:1])[0]
    for mates in (["carol"], ["bob"], ["alice"], ["bob", "carol"]):
        rows = torch.cat([ids[:1]] + [ids[1:2]] * len(mates))
        batched = dl.forward(["alice", *mates], rows)[0]
        torch.testing.assert_close(batched[:1], alone, rtol=0, atol=0)
    generated = dl.generate_batch([("alice", FACTS[0][0]), ("bob", FACTS[0][0])], max_new_tokens=6)
    assert generated[0].token_ids == dl.generate_batch([("alice", FACTS[0][0])], max_new_tokens=6)[0].token_ids


# -- errors -------------------------------------------------------------------------------------------------------
def test_every_library_error_names_the_problem_as_a_dynamiclora_error():
    dl = make_dl()
    dl.agent("alice", swarm="s", domain="d")
    cases = [
        (lambda: dl.agent("bob", swarm="s", domain="other"), "belongs to domain 'd'"),
        (lambda: dl.agent("alice", swarm="t", domain="d"), "already registered"),
        (lambda: dl.agent("", swarm="s", domain="d"), "agent id must be"),
        (lambda: dl.agent("alice").generate(""), "empty"),
        (lambda: dl.remove_circuit("nope"), "no circuit has id"),
        (lambda: dl.export_peft("x"), "exactly one of"),
    ]
    for call, message in cases:
        with pytest.raises(DynamicLoRAError, match=message):
            call()


def test_registration_is_one_atomic_step_and_conflicts_are_4xx(tmp_path):
    from dynamiclora.server import create_app

    dl = make_dl()
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN, batch_wait_s=0.01)
    with TestClient(app) as client:

        def register(body):
            return client.post("/v1/agents", json=body, headers=ADMIN_HEADERS)

        assert register({"id": "alice", "swarm": "s", "domain": "d"}).status_code == 201
        r = register({"id": "bob", "swarm": "s", "domain": "elsewhere"})
        assert r.status_code == 409 and r.json()["error"]["param"] == "domain", r.text
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(register, [{"id": "carol", "swarm": "s", "domain": "d"}] * 8))
        assert sorted(a.status_code for a in answers) == [201] + [409] * 7
        (key,) = [a.json()["api_key"] for a in answers if a.status_code == 201]
        r = client.post(
            "/v1/completions",
            json={"model": "carol", "prompt": "def f(x):", "max_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text  # the winner's key is the one that works


# -- the property, over random interleavings ----------------------------------------------------------------------
AGENTS = {"a1": ("s1", "d1"), "a2": ("s1", "d1"), "b1": ("s2", "d1"), "c1": ("s3", "d2")}


def test_served_outputs_equal_uncached_decoding_and_equal_hashes_mean_equal_outputs(tmp_path):
    """Random interleavings of learning, generation in both modes, ticks with migration and consensus, imports,
    save and a restart: every served output is uncached greedy decoding under the state of that moment, and an
    agent whose provenance hash is one it had before scores every prompt exactly as it did then."""
    config = DynamicLoRAConfig(wavegen=OPEN, dynamics={"tick_interval": 0})
    dl = make_dl(config=config)
    for a, (s, d) in AGENTS.items():
        dl.agent(a, swarm=s, domain=d)
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    prompts = [p for p, _ in FACTS] + OTHERS
    probes = prompts + NEAR
    seen: dict[tuple[str, str, str], torch.Tensor] = {}  # (agent, provenance hash, prompt) -> logits
    served = {"jump": 0, "verify": 0, "hits": 0, "checked_again": 0}

    def check_scores(agent_id: str) -> None:
        agent = dl.agent(agent_id)
        digest = agent.snapshot().provenance_hash
        for p in probes:
            now = scored(agent, p)
            before = seen.setdefault((agent_id, digest, p), now)
            if before is not now:
                served["checked_again"] += 1
            torch.testing.assert_close(now, before, rtol=0, atol=0, msg=f"{agent_id} moved on {p!r}, hash did not")

    for step in range(200):
        op = rng.random()
        agent_id = rng.choice(list(AGENTS))
        if op < 0.55:  # generate (the same prompts again and again, by teammates too)
            p, mode = rng.choice(prompts), rng.choice(["jump", "verify"])
            r = dl.agent(agent_id).generate(p, max_new_tokens=5, mode=mode)
            served[mode] += 1
            served["hits"] += r.cache != "miss"
            assert r.token_ids == uncached(dl, agent_id, p, 5), f"step {step}: {mode} {r.cache} served another output"
        elif op < 0.7:  # learn a fact (critical ones move to the agent tier at the next tick)
            p, c = rng.choice(FACTS)
            dl.agent(agent_id).learn(p, c, critical=rng.random() < 0.3)
        elif op < 0.78:  # a tick: phases, decay, migration, consensus
            dl.tick()
        elif op < 0.82:  # an import into a shared scope or an agent's own tier
            scope = rng.choice(["foundation", "domain:d1", "swarm:s1", f"agent:{agent_id}"])
            dl.add_circuit(scope, random_circuit(dl, 2, g, magnitude=0.05))
        elif op < 0.87:  # a pattern two teammates share proves itself: consensus into their swarm
            shared = random_circuit(dl, 2, g, magnitude=0.1)
            for member in ("a1", "a2"):
                c = random_circuit(dl, 2, torch.Generator().manual_seed(step), magnitude=0.1)
                c.factors = {m: (a.clone(), b.clone()) for m, (a, b) in shared.factors.items()}
                dl.add_circuit(f"agent:{member}", c, pinned=False)
                c.series, c.uses_this_tick = [1] * dl.memory.window("agent"), 1
                c.entered_tick = dl.tick_count - dl.memory.window("agent")
            dl.tick()
        elif op < 0.92:  # save, and restart from the saved state
            dl.save(tmp_path / "state")
            dl = DynamicLoRA.load(tmp_path / "state", model=make_dl().model, tokenizer=dl.tokenizer)
        check_scores(agent_id)
    assert served["jump"] > 20 and served["verify"] > 20 and served["hits"] > 20, served
    assert served["checked_again"] > 100, served
    kinds = {m.get("kind", "migration") for m in dl.migrations()} | {m["to"].split(":")[0] for m in dl.migrations()}
    assert {"agent", "swarm"} <= kinds, kinds  # migration and consensus both happened


def test_a_jump_says_whether_it_ran_the_model():
    dl = make_dl(config=DynamicLoRAConfig(wavegen=OPEN, dynamics={"tick_interval": 0}))
    alice = dl.agent("alice", swarm="team", domain="d")
    prompt = "def parse(text):"
    alice.generate(prompt, max_new_tokens=6)
    assert alice.generate(prompt, max_new_tokens=6, mode="jump").jumped
    alice.learn(prompt, " return json")
    assert not alice.generate(prompt, max_new_tokens=6, mode="jump").jumped  # a faster tier acts: verified
