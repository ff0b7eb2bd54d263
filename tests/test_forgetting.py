"""Forgetting on request: what an agent taught for one prompt, or everything it taught, comes back out of the
memory where it is separable (a gate key only it put there), and what is not separable is reported."""

from __future__ import annotations

import torch

from dynamiclora import DynamicLoRA
from dynamiclora.gates import Gate
from dynamiclora.testing import tiny_model

from .conftest import make_dl, random_circuit

P1, A1 = "def alpha_port():", " return 7311"
P2, A2 = "class Zebra:", " stripes = 12"


def logits(dl, agent: str, prompt: str) -> torch.Tensor:
    return dl.agent(agent).logits(torch.tensor([dl.encode(prompt)]))[0]


def teach(dl, agent: str, prompt: str, completion: str) -> None:
    for _ in range(8):
        dl.agent(agent).learn(prompt, completion)
        if dl.agent(agent).generate(prompt, max_new_tokens=12, use_cache=False).text.startswith(completion):
            return
    raise AssertionError(f"{agent} did not learn {prompt!r}")


def test_forgetting_a_prompt_takes_back_what_was_taught_for_it_and_nothing_else(tmp_path):
    dl = make_dl()
    dl.agent("alice", swarm="team", domain="python")
    untaught = logits(dl, "alice", P1)
    teach(dl, "alice", P1, A1)
    teach(dl, "alice", P2, A2)
    kept = logits(dl, "alice", P2)
    report = dl.agent("alice").forget(P1)
    assert report["keys_removed"] >= 1 and not report["not_separable"], report
    torch.testing.assert_close(logits(dl, "alice", P1), untaught, atol=1e-5, rtol=0)  # as if never taught
    torch.testing.assert_close(logits(dl, "alice", P2), kept, atol=1e-5, rtol=0)  # the other fact stays
    dl.save(tmp_path / "state")
    model, tokenizer = tiny_model("llama")
    again = DynamicLoRA.load(tmp_path / "state", model=model, tokenizer=tokenizer)
    torch.testing.assert_close(logits(again, "alice", P1), untaught, atol=1e-5, rtol=0)  # and it stays forgotten


def shared_circuit(dl, keys: dict[str, str], seed: int = 0):
    """A swarm circuit whose gate has one key per prompt, each owned by the agent named for it."""
    circuit = random_circuit(dl, 4, torch.Generator().manual_seed(seed), magnitude=0.2)
    features = dl.router.features([dl.encode(p) for p in keys.values()])
    radius = dl.router.new_radius
    circuit.gate = Gate(features.float(), torch.full((len(keys),), radius), tuple((a,) for a in keys))
    return dl.add_circuit("swarm:team", circuit)


def test_deleting_an_agent_takes_its_keys_out_of_a_shared_gate_and_reports_the_delta():
    dl = make_dl()
    for agent in ("ana", "ben", "cy"):
        dl.agent(agent, swarm="team", domain="python")
    base_p1 = logits(dl, "cy", P1)
    both = shared_circuit(dl, {"ana": P1, "ben": P2})
    only_ana = shared_circuit(dl, {"ana": P1 + " #"}, seed=1)
    acted_p1, ben_p2 = logits(dl, "cy", P1), logits(dl, "ben", P2)
    assert (acted_p1 - base_p1).abs().max() > 1e-3  # the shared circuit acts on ana's prompt for everyone
    report = dl.delete_agent("ana")
    shared = report["shared"]
    assert shared["keys_removed"] == 2 and shared["circuits_removed"] == [only_ana.id], report
    assert [n["circuit"] for n in shared["not_separable"]] == [both.id], report  # its delta carries ben's too
    assert dl.hierarchy.find_circuit(both.id)[1].gate.owners == (("ben",),)
    torch.testing.assert_close(logits(dl, "cy", P1), base_p1, atol=1e-5, rtol=0)  # ana's prompt: no longer
    torch.testing.assert_close(logits(dl, "ben", P2), ben_p2, atol=1e-5, rtol=0)  # ben's: as before


def test_a_key_two_agents_taught_is_not_taken_by_one_of_them():
    dl = make_dl()
    for agent in ("ana", "ben"):
        dl.agent(agent, swarm="team", domain="python")
    circuit = shared_circuit(dl, {"ana": P1})
    circuit.gate = Gate(circuit.gate.keys, circuit.gate.radii, (("ana", "ben"),))
    before = logits(dl, "ben", P1)
    report = dl.agent("ana").forget(P1)
    assert report["keys_removed"] == 0 and report["not_separable"][0]["circuit"] == circuit.id, report
    assert "other agents" in report["not_separable"][0]["why"]
    assert dl.hierarchy.find_circuit(circuit.id)[1].gate.owners == (("ben",),)  # ana is no longer an owner
    torch.testing.assert_close(logits(dl, "ben", P1), before, atol=0, rtol=0)
    report = dl.agent("ben").forget(P1)  # the last owner: the key goes, and with it the circuit
    assert report["circuits_removed"] == [circuit.id], report


def test_gate_owners_survive_save_and_load(tmp_path):
    dl = make_dl()
    dl.agent("ana", swarm="team", domain="python")
    teach(dl, "ana", P1, A1)
    circuit = shared_circuit(dl, {"ana": P1, "ben": P2})
    dl.save(tmp_path / "state")
    model, tokenizer = tiny_model("llama")
    again = DynamicLoRA.load(tmp_path / "state", model=model, tokenizer=tokenizer)
    assert again.hierarchy.find_circuit(circuit.id)[1].gate.owners == (("ana",), ("ben",))
    own = [c for c in again.hierarchy.all_circuits() if c.tier == "context"]
    assert own and all(c.gate.owners == (("ana",),) * c.gate.keys.shape[0] for c in own)
