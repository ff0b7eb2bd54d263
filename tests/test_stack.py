"""The stacked forward pass: fused == naive, merged == unmerged, heterogeneous == row by row, usage probes."""

from __future__ import annotations

import re

import pytest
import torch

from dynamiclora import AdapterConfig, DynamicLoRAConfig

from .conftest import make_dl, populate

TEAM = {
    "alice": ("backend", "python"),
    "bob": ("backend", "python"),
    "carol": ("frontend", "python"),
    "dave": ("ml", "research"),
}


def naive_logits(dl, agent_id: str, ids: torch.Tensor) -> torch.Tensor:
    """Reference: the unwrapped base layers plus a plain Python sum over every circuit of the stack."""
    circuits = [c for s in dl.hierarchy.stack_scopes(agent_id) for c in s.circuits.values()]
    hooks = []
    for name, layer in dl.layers.items():

        def hook(module, inputs, output, name=name):
            x = inputs[0]
            delta = sum(
                c.scale * (x @ c.factors[name][0].T) @ c.factors[name][1].T for c in circuits if name in c.factors
            )
            return output + delta

        hooks.append(layer.base_layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return dl.model(input_ids=ids, use_cache=False).logits  # layers without a plan run the base layer
    finally:
        for h in hooks:
            h.remove()


def test_fused_equals_naive_per_circuit_sum(any_dl, ids):
    populate(any_dl, TEAM, per_scope=3, rank=4)
    for agent in TEAM:
        fused = any_dl.agent(agent).logits(ids)
        reference = naive_logits(any_dl, agent, ids)
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(fused, naive_logits_without_circuits(any_dl, ids), atol=1e-3)


def naive_logits_without_circuits(dl, ids):
    with torch.no_grad():
        return dl.model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("merged", [(), ("foundation",), ("foundation", "domain", "swarm", "agent")])
def test_merged_equals_unmerged(ids, merged):
    unmerged = make_dl(config=DynamicLoRAConfig(adapter=AdapterConfig(merged_tiers=())))
    other = make_dl(config=DynamicLoRAConfig(adapter=AdapterConfig(merged_tiers=merged)))
    populate(unmerged, TEAM, seed=3)
    populate(other, TEAM, seed=3)
    for agent in TEAM:
        torch.testing.assert_close(
            other.agent(agent).logits(ids), unmerged.agent(agent).logits(ids), rtol=1e-4, atol=1e-4
        )


def test_heterogeneous_batch_equals_rows_alone(any_dl):
    populate(any_dl, TEAM, per_scope=2, rank=3)
    agents = ["alice", "carol", "bob", "dave", "alice"]  # two swarms, two domains, a repeated agent
    ids = torch.randint(5, 500, (len(agents), 10), generator=torch.Generator().manual_seed(2))
    batch, _ = any_dl.forward(agents, ids)
    assert any_dl.planner.plan(agents).hetero
    for row, agent in enumerate(agents):
        alone = any_dl.agent(agent).logits(ids[row : row + 1])
        torch.testing.assert_close(batch[row : row + 1], alone, rtol=1e-4, atol=1e-4)


def test_circuits_on_some_modules_leave_the_others_to_the_base_layer(ids):
    """Circuits that cover some modules only (fact circuits: the value projections): a module no circuit of a
    plan covers gets no low-rank path at all, and the output is still the naive sum, alone and batched."""
    dl = make_dl(config=DynamicLoRAConfig(adapter=AdapterConfig(merged_tiers=())))
    populate(dl, TEAM, per_scope=2, rank=3)
    for i, scope in enumerate(dl.hierarchy.scopes.values()):
        kept = r"self_attn\.v_proj" if i % 2 else r"self_attn\.(q|v)_proj"  # grouped with q in some scopes
        for c in scope.circuits.values():
            c.factors = {n: f for n, f in c.factors.items() if re.search(kept, n)}
        scope.touch()
    dl.planner.clear()
    agents = list(TEAM)
    plan = dl.planner.plan(agents)
    for name, mp in plan.modules.items():
        assert (mp.a is not None) == bool(re.search(r"self_attn\.(q|v)_proj", name)), name
    batch_ids = ids[:1].expand(len(agents), -1)
    batch, _ = dl.forward(agents, batch_ids)
    for row, agent in enumerate(agents):
        alone = dl.agent(agent).logits(ids[:1])
        torch.testing.assert_close(alone, naive_logits(dl, agent, ids[:1]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch[row : row + 1], alone, rtol=1e-4, atol=1e-4)


def test_shared_swarm_is_merged_in_a_batch_of_one_team(dl):
    populate(dl, TEAM)
    plan = dl.planner.plan(["alice", "bob"])
    assert all(mp.weight is not None for mp in plan.modules.values())  # foundation+domain+swarm merged
    plan = dl.planner.plan(["alice", "carol"])  # swarms differ: each row through its own effective weight
    assert all(mp.weight is None and len(mp.weight_rows) == 2 for mp in plan.modules.values())
    swarm_ids = {c.id for s in ("swarm:backend", "swarm:frontend") for c in dl.hierarchy.scope(s).circuits.values()}
    assert not swarm_ids & {c.id for c in plan.circuits}  # the (ungated) swarm circuits are merged, per row


def test_effective_weight_rebuilt_only_when_content_changes(dl, ids):
    populate(dl, TEAM)
    alice = dl.agent("alice")
    alice.logits(ids)
    builds = dl.planner.merge_builds
    alice.logits(ids)
    dl.hierarchy.scope("context:alice").touch()  # the per-agent tier changes: merged weights stay
    alice.logits(ids)
    assert dl.planner.merge_builds == builds
    circuit = next(iter(dl.hierarchy.scope("swarm:backend").circuits.values()))
    circuit.scale *= 2
    dl.hierarchy.scope("swarm:backend").touch()
    before = dl.planner.merge_builds
    alice.logits(ids)
    assert dl.planner.merge_builds == before + 1


@pytest.mark.parametrize("rows", [["alice"] * 3, ["alice", "carol", "bob"]])
def test_usage_observation_matches_direct_computation(dl, ids, rows):
    """Per row and circuit: sqrt of the mean over modules of ‖A_c x‖² / (‖x‖² rms(A_c)²), for homogeneous and
    heterogeneous batches (per-row factors) alike, with grouped A-projections."""
    populate(
        dl,
        {"alice": ("backend", "python"), "bob": ("backend", "python"), "carol": ("frontend", "python")},
        per_scope=1,
    )
    logits, session = dl.forward(rows, ids)
    plan = dl.planner.plan(rows)
    assert plan.hetero == (len(set(rows)) > 1)
    assert any(mp.group_a is not None for mp in plan.modules.values())
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, i[0].detach()))
        for name, layer in dl.layers.items()
    ]
    with torch.no_grad(), dl.runtime.activate(plan):
        dl.model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for col, c in enumerate(plan.circuits):
        ratios = []
        for name, x in captured.items():
            a = c.factors[name][0]
            rms2 = a.pow(2).sum() / a.shape[0]
            ratios.append((x @ a.T).pow(2).sum((1, 2)) / x.pow(2).sum((1, 2)) / rms2)  # per row
        expected = torch.stack(ratios).mean(0).sqrt()
        in_stack = torch.tensor([col in cols for cols in plan.row_columns], dtype=torch.float)
        torch.testing.assert_close(session.activations()[:, col], expected * in_stack, rtol=1e-4, atol=1e-5)


def test_activation_is_one_inside_and_zero_outside_the_subspace(dl):
    """A circuit whose A rows span every input direction has activation 1; one orthogonal to them has 0."""
    from dynamiclora import Circuit

    dl.agent("alice", swarm="s", domain="d")
    ids = torch.randint(5, 500, (1, 6), generator=torch.Generator().manual_seed(4))
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, i[0].detach()))
        for name, layer in dl.layers.items()
    ]
    dl.agent("alice").logits(ids)
    for h in hooks:
        h.remove()
    inside, outside = {}, {}
    for name, x in captured.items():
        x = x.reshape(-1, x.shape[-1])
        q, _ = torch.linalg.qr(torch.cat([x.T, torch.randn(x.shape[1], 8)], 1))  # (in, k): first 6 span x
        inside[name] = (q[:, :6].T.contiguous(), torch.zeros(dl.layers[name].out_features, 6))
        outside[name] = (q[:, 6:8].T.contiguous(), torch.zeros(dl.layers[name].out_features, 2))
    dl.add_circuit("context:alice", Circuit(factors=inside, tier="context", scope="alice", id="inside"))
    dl.add_circuit("context:alice", Circuit(factors=outside, tier="context", scope="alice", id="outside"))
    _, session = dl.forward(["alice"], ids)
    plan = dl.planner.plan(["alice"])
    acts = {c.id: float(session.activations()[0, i]) for i, c in enumerate(plan.circuits)}
    assert acts["inside"] == pytest.approx(1.0, abs=1e-3)
    assert acts["outside"] == pytest.approx(0.0, abs=1e-3)


def test_without_circuits_the_stack_is_the_base_model(any_dl, ids):
    any_dl.agent("alice", swarm="s", domain="d")
    with torch.no_grad():
        base = any_dl.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(any_dl.agent("alice").logits(ids), base, rtol=0, atol=0)


def test_wrapping_a_wrapped_model_again_reuses_its_layers(dl, ids):
    from dynamiclora import DynamicLoRA

    again = DynamicLoRA(dl.model, dl.tokenizer)
    assert sorted(again.layers) == sorted(dl.layers)
    assert all(again.layers[n] is dl.layers[n] for n in dl.layers)
    assert again.base_fingerprint == dl.base_fingerprint
    assert not any(".base_layer.base_layer" in n for n, _ in dl.model.named_modules())


def test_cached_batch_plans_stay_within_their_byte_budget_and_rebuild_exactly(ids):
    from itertools import combinations

    from dynamiclora.planner import plan_nbytes

    dl = make_dl("llama")
    populate(dl, TEAM)
    planner = dl.runtime.planner
    one = plan_nbytes(planner.plan(("alice", "carol", "dave")))
    planner.clear()
    dl.config.adapter.plan_cache_bytes = 2 * one  # room for two such plans
    expected = {row: dl.forward([row], ids[:1])[0] for row in TEAM}
    for size in (2, 3):
        for rows in combinations(TEAM, size):
            planner.plan(rows)
            assert planner.plan_cache_bytes() <= 2 * one  # older plans were dropped to make room
    for row in TEAM:  # a dropped plan is rebuilt to the same outputs
        torch.testing.assert_close(dl.forward([row], ids[:1])[0], expected[row], rtol=0, atol=0)
