"""Routing: a context circuit acts on the prompts it learned from and leaves every other input exactly alone."""

from __future__ import annotations

import pytest
import torch

from dynamiclora import DynamicLoRA, DynamicLoRAConfig, LearningConfig
from dynamiclora.errors import ConfigError
from dynamiclora.gates import Gate

from .conftest import make_dl

FACTS = [("def get_alpha_port():", " return 'cedar'"), ("def get_bravo_level():", " return 'onyx'")]
OTHER = "import os\nprint(os.getcwd())"


def logits(agent, prompt: str, completion: str = "") -> torch.Tensor:
    dl = agent.dl
    p = dl.encode(prompt)
    return agent.logits(torch.tensor([p + dl.encode(completion, special=False)]), route_tokens=len(p))


def base_logits(dl: DynamicLoRA, text: str) -> torch.Tensor:
    with torch.no_grad():
        return dl.model(input_ids=torch.tensor([dl.encode(text)])).logits


def test_distinct_prompts_get_distinct_gated_circuits_and_repeats_reuse_them(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    first = [alice.learn(p, c) for p, c in FACTS]
    again = [alice.learn(p, c) for p, c in FACTS]
    assert all(r.spawned for r in first) and first[0].circuit_id != first[1].circuit_id
    assert [r.circuit_id for r in again] == [r.circuit_id for r in first] and not any(r.spawned for r in again)
    assert all(c["gated"] for c in dl.circuits(tier="context"))


def test_learning_leaves_unrelated_inputs_and_other_facts_exactly_unchanged(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    alice.learn(*FACTS[0])
    first_fact = logits(alice, *FACTS[0])
    for _ in range(3):
        alice.learn(*FACTS[1])
    torch.testing.assert_close(logits(alice, *FACTS[0]), first_fact, rtol=0, atol=0)  # isolation
    torch.testing.assert_close(alice.logits(torch.tensor([dl.encode(OTHER)])), base_logits(dl, OTHER))
    assert not torch.allclose(logits(alice, *FACTS[1]), base_logits(dl, FACTS[1][0] + FACTS[1][1]))


def test_routing_off_makes_ungated_circuits_that_reach_everything():
    dl = make_dl(config=DynamicLoRAConfig(learning=LearningConfig(routing=False)))
    alice = dl.agent("alice", swarm="s", domain="d")
    alice.learn(*FACTS[0])
    assert not any(c["gated"] for c in dl.circuits())
    assert not torch.allclose(alice.logits(torch.tensor([dl.encode(OTHER)])), base_logits(dl, OTHER))


def test_heterogeneous_batch_routes_each_row_as_it_would_alone(dl):
    for name, (p, c) in zip(("alice", "bob"), FACTS):
        agent = dl.agent(name, swarm="s", domain="d")
        for _ in range(2):
            agent.learn(p, c)
    requests = [("alice", FACTS[0][0]), ("bob", FACTS[1][0]), ("alice", FACTS[1][0]), ("bob", OTHER)]
    batched = dl.generate_batch(requests, max_new_tokens=6)
    alone = [dl.generate_batch([r], max_new_tokens=6)[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_migration_keeps_the_gate_and_the_outputs(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    r = alice.learn(*FACTS[0])
    before = (logits(alice, *FACTS[0]), logits(alice, OTHER))
    scope, c = dl.hierarchy.find_circuit(r.circuit_id)
    dl.memory.move(c, scope, dl.hierarchy.scope(("agent", "alice")), None)
    after = (logits(alice, *FACTS[0]), logits(alice, OTHER))
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gates_are_content_and_survive_save_and_load(dl, tmp_path):
    alice = dl.agent("alice", swarm="s", domain="d")
    r = alice.learn(*FACTS[0])
    circuit = dl.hierarchy.find_circuit(r.circuit_id)[1]
    digest, gate = circuit.content_hash(), circuit.gate
    for changed in (Gate(gate.keys + 1e-3, gate.radii), Gate(gate.keys, gate.radii * 1.01)):
        circuit.gate = changed  # the gate decides outputs: the hash must see its keys and its radii
        assert circuit.content_hash() != digest
    circuit.gate = gate
    alice.learn(*FACTS[1])
    dl.save(tmp_path / "state")
    again = DynamicLoRA.load(tmp_path / "state", model=make_dl().model, tokenizer=dl.tokenizer)
    for prompt in (FACTS[0][0], FACTS[1][0], OTHER):
        assert again.route(["alice"], [dl.encode(prompt)]) == dl.route(["alice"], [dl.encode(prompt)])
        torch.testing.assert_close(logits(again.agent("alice"), prompt), logits(alice, prompt))


def test_bad_routing_settings_name_the_field():
    with pytest.raises(ConfigError, match="route_radius"):
        LearningConfig(route_radius=0.0)
    with pytest.raises(ConfigError, match="route_module"):
        make_dl(config=DynamicLoRAConfig(learning=LearningConfig(route_module="no.such.module")))


def test_consensus_of_gated_circuits_shares_a_gated_circuit_that_acts_on_their_prompts_only():
    from .conftest import random_circuit
    from .test_swarms import copy, persistent, team

    dl = team()
    prompt, other = dl.encode(FACTS[0][0]), dl.encode(OTHER)
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(7), magnitude=0.3)
    for n in ("a", "b"):
        gated = copy(delta)
        gated.gate = Gate.single(dl.router.features([prompt])[0], dl.router.new_radius)
        persistent(dl, n, gated)

    def outputs(name):
        agent = dl.agent(name)
        return logits(agent, *FACTS[0]), agent.logits(torch.tensor([other]))

    before = {n: outputs(n) for n in ("a", "b", "c", "x")}
    assert dl.tick().shared
    [shared] = dl.hierarchy.scope("swarm:team").circuits.values()
    assert shared.gate is not None  # the union of its contributors' gates
    for n in ("a", "b", "x"):  # contributors keep their outputs everywhere; the other swarm is untouched
        for now, then in zip(outputs(n), before[n]):
            torch.testing.assert_close(now, then, rtol=1e-4, atol=1e-4)
    on_prompt, elsewhere = outputs("c")  # a member inherits the pattern on its prompt, and only there
    assert not torch.allclose(on_prompt, before["c"][0], atol=1e-3)
    torch.testing.assert_close(elsewhere, before["c"][1], rtol=0, atol=0)
    batched = dl.forward(["a", "c"], torch.tensor([prompt, prompt]))[0]  # gated shared circuit runs unmerged
    torch.testing.assert_close(batched[1:], dl.forward(["c"], torch.tensor([prompt]))[0], rtol=1e-5, atol=1e-5)


def test_a_request_uses_the_gated_circuits_its_prompt_reaches(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    first, second = (alice.learn(p, c).circuit_id for p, c in FACTS)
    circuits = {cid: dl.hierarchy.find_circuit(cid)[1] for cid in (first, second)}
    before = {cid: c.uses_this_tick for cid, c in circuits.items()}
    alice.generate(FACTS[0][0], max_new_tokens=4, use_cache=False)
    dl.generate_ids(["alice"], [dl.encode(FACTS[1][0])], dl.config.generation)  # an internal check: no use
    assert circuits[first].uses_this_tick == before[first] + 1 and circuits[second].uses_this_tick == before[second]


# A template with a long fixed system prompt, as real instruct models have (SmolLM2's is 19 tokens of a 30-token
# scaffold): mean-pooled over every token, two different questions would look alike.
LONG_SYSTEM = (
    "{{ 'You are the helpful assistant of the platform team. Answer briefly, precisely and politely, and cite the "
    "conventions of the team where they apply.\\n' }}"
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"
)


def test_a_conversation_routes_by_what_its_author_wrote_not_by_the_template():
    from dynamiclora.testing import tiny_chat_model

    model, tokenizer = tiny_chat_model("llama")
    tokenizer.chat_template = LONG_SYSTEM
    dl = DynamicLoRA(model, tokenizer)
    alice, bystander = dl.agent("alice", swarm="s", domain="d"), dl.agent("bystander", swarm="t", domain="d")
    taught, other = "where does staging listen", "how are release branches named"
    ids = {q: dl.runtime.chat_ids([{"role": "user", "content": q}]) for q in (taught, other)}
    start, end = dl.runtime.chat.content_span(ids[taught])
    assert dl.tokenizer.decode(ids[taught][start:end]).strip() == taught  # the scaffold is left out
    assert dl.runtime.chat.content_span(dl.encode(taught)) == (0, len(dl.encode(taught)))  # plain text: all of it
    before = {q: bystander.logits(torch.tensor([i])) for q, i in ids.items()}
    r = alice.learn(messages=[{"role": "user", "content": taught}], completion=" on port 8443")
    assert not torch.equal(alice.logits(torch.tensor([ids[taught]])), before[taught])
    assert torch.equal(alice.logits(torch.tensor([ids[other]])), before[other])  # its gate stays closed
    assert dl.hierarchy.find_circuit(r.circuit_id)[1].label.startswith(taught)  # named by the question
