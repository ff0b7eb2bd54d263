"""Provenance hashes change exactly when weights change."""

from __future__ import annotations

import copy

import torch

from dynamiclora import Circuit

from .conftest import make_dl, populate, random_circuit

TEAM = {"alice": ("backend", "python"), "bob": ("backend", "python"), "carol": ("frontend", "python")}


def test_equal_weights_give_equal_hashes_across_instances():
    a, b = make_dl(), make_dl()
    populate(a, TEAM, seed=5)
    populate(b, TEAM, seed=5)
    for agent in TEAM:
        assert a.snapshot(agent).provenance_hash == b.snapshot(agent).provenance_hash


def test_insertion_order_and_ids_do_not_matter(dl):
    dl.agent("alice", swarm="s", domain="d")
    g = torch.Generator().manual_seed(0)
    circuits = [random_circuit(dl, 4, g) for _ in range(4)]
    for c in circuits:
        dl.add_circuit("swarm:s", copy.deepcopy(c))
    forward = dl.snapshot("alice").provenance_hash
    scope = dl.hierarchy.scope("swarm:s")
    for cid in list(scope.circuits):
        scope.remove(cid)
    for c in reversed(circuits):
        clone = copy.deepcopy(c)
        clone.id = "renamed-" + c.id
        dl.add_circuit("swarm:s", clone)
    assert dl.snapshot("alice").provenance_hash == forward


def test_any_weight_or_scale_change_changes_the_hash(dl):
    populate(dl, TEAM)
    scope = dl.hierarchy.scope("domain:python")
    circuit = next(iter(scope.circuits.values()))
    seen = {dl.snapshot("alice").provenance_hash}
    module = next(iter(circuit.factors))
    for change in ("A", "B", "scale"):
        if change == "scale":
            circuit.scale += 1e-6
        else:
            t = circuit.factors[module][0 if change == "A" else 1]
            t.view(-1)[7] += 1e-7 if t.view(-1)[7] != 0 else 1.0
        scope.touch()
        digest = dl.snapshot("alice").provenance_hash
        assert digest not in seen, change
        seen.add(digest)


def test_hash_depends_only_on_the_agents_own_stack(dl):
    populate(dl, TEAM)
    alice, carol = dl.snapshot("alice").provenance_hash, dl.snapshot("carol").provenance_hash
    g = torch.Generator().manual_seed(9)
    dl.add_circuit("context:bob", random_circuit(dl, 2, g))
    dl.add_circuit("swarm:frontend", random_circuit(dl, 2, g))
    assert dl.snapshot("alice").provenance_hash == alice  # bob's context and another swarm: not in alice's stack
    assert dl.snapshot("carol").provenance_hash != carol


def test_a_circuit_moved_between_tiers_changes_the_hash(dl):
    """The same content in another tier is another stack layout: positions are part of the hash."""
    dl.agent("alice", swarm="s", domain="d")
    c = random_circuit(dl, 2, torch.Generator().manual_seed(1))
    dl.add_circuit("context:alice", c)
    before = dl.snapshot("alice").provenance_hash
    dl.hierarchy.scope("context:alice").remove(c.id)
    dl.add_circuit("agent:alice", c)
    assert dl.snapshot("alice").provenance_hash != before


def test_base_model_and_tokenizer_enter_the_hash():
    a, b = make_dl(seed=0), make_dl(seed=1)  # same tokenizer, other random weights
    for d in (a, b):
        d.agent("alice", swarm="s", domain="d")
    assert a.base_fingerprint != b.base_fingerprint
    assert a.snapshot("alice").provenance_hash != b.snapshot("alice").provenance_hash


def test_circuit_records_round_trip():
    c = Circuit(factors={"m": (torch.ones(2, 3), torch.ones(4, 2))}, tier="agent", scope="a", label="x")
    again = Circuit.from_record(c.record(), c.factors)
    assert again.record() == c.record()
