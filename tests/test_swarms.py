"""Resonance consensus: the gain law, cancellation, orthogonal retention, the poisoning bound, and the sharing step
of the tick on a real (tiny) model: contributors keep their outputs, other members gain the shared circuit."""

from __future__ import annotations

import pytest
import torch

from dynamiclora import Circuit, DynamicLoRAConfig
from dynamiclora.config import DynamicsConfig
from dynamiclora.dynamics.resonance import Proposal, combine, gram, resonate

from .conftest import make_dl, random_circuit

S, GAIN, MAX_GAIN = 0.5, 0.1, 1.5


def dense(c: Circuit) -> dict[str, torch.Tensor]:
    return {m: c.delta(m).double() for m in c.factors}


def inner(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    return float(sum((x[m] * y[m]).sum() for m in x.keys() & y.keys()))


def shared_dense(proposals: list[Proposal]) -> dict[str, torch.Tensor]:
    """The shared delta the rule produces, re-factorized and then densified."""
    result = resonate(proposals, S, GAIN, MAX_GAIN)
    terms = [(p.circuit, float(c)) for p, c in zip(proposals, result.coefficients) if c != 0]
    if not terms:
        return {}
    return dense(Circuit(factors=combine(terms), tier="", scope=""))


def scaled(c: Circuit, factor: float) -> Circuit:
    return Circuit(factors=c.factors, tier="", scope="", scale=c.scale * factor)


def test_gram_is_every_pairs_dense_inner_product_across_ranks_scales_and_modules():
    dl = make_dl()
    g = torch.Generator().manual_seed(5)
    circuits = [random_circuit(dl, r, g, scale=s) for r, s in ((1, 1.0), (4, 0.5), (2, 2.0), (3, 1.0))]
    names = sorted(dl.layers)
    circuits[2].factors = {m: circuits[2].factors[m] for m in names[: len(names) // 2]}  # covers half the modules
    circuits[3].factors = {m: circuits[3].factors[m] for m in names[len(names) // 2 :]}  # the other half
    dense64 = [{m: c.scale * (b.double() @ a.double()) for m, (a, b) in c.factors.items()} for c in circuits]
    expected = torch.tensor([[inner(x, y) for y in dense64] for x in dense64], dtype=torch.float64)
    assert expected[2, 3] == 0 and expected[0, 2] != 0
    torch.testing.assert_close(gram(circuits), expected, rtol=1e-9, atol=1e-12)


@pytest.fixture
def base():
    dl = make_dl()
    g = torch.Generator().manual_seed(3)
    return dl, [random_circuit(dl, 4, g) for _ in range(4)]


def orthogonalize(x: Circuit, y: Circuit) -> Circuit:
    """x minus its projection on y, as a circuit (rank of both)."""
    coef = inner(dense(x), dense(y)) / inner(dense(y), dense(y))
    return Circuit(factors=combine([(x, 1.0), (y, -coef)]), tier="", scope="")


def props(circuits: list[Circuit]) -> list[Proposal]:
    return [Proposal(c, frozenset({f"agent{i}"})) for i, c in enumerate(circuits)]


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_aligned_contributions_amplify_by_the_capped_gain_law(base, n):
    _, (delta, *_) = base
    shared = shared_dense(props([delta] * n))
    d = dense(delta)
    expected = min(MAX_GAIN, 1 + GAIN * (n - 1))
    assert expected >= 1.0
    for m in d:
        torch.testing.assert_close(shared[m], expected * d[m], rtol=1e-5, atol=1e-7)


def test_a_lone_contribution_does_not_enter(base):
    _, (delta, *_) = base
    assert shared_dense(props([delta])) == {}
    verdict = resonate(props([delta]), S, GAIN, MAX_GAIN).verdicts[0]
    assert not verdict.enters and verdict.support == 0


def test_opposed_contributions_cancel(base):
    _, (delta, *_) = base
    assert shared_dense(props([delta, scaled(delta, -1.0)])) == {}  # neither resonates: the scope stays empty
    # two for, one against: the opposition divides the group's weight
    shared = shared_dense(props([delta, delta, scaled(delta, -1.0)]))
    d = dense(delta)
    ratio = inner(shared, d) / inner(d, d)
    assert ratio == pytest.approx(2 * (1 + GAIN) / 3, rel=1e-5)


def test_orthogonal_groups_are_both_kept(base):
    _, (x, y, *_) = base
    y = orthogonalize(y, x)
    assert abs(inner(dense(x), dense(y))) < 1e-6 * inner(dense(x), dense(x))
    shared = shared_dense(props([x, x, y, y]))
    for c in (x, y):
        d = dense(c)
        assert inner(shared, d) / inner(d, d) == pytest.approx(1 + GAIN, rel=1e-4)


def test_poisoning_bound(base):
    _, (honest, poison, *_) = base
    poison = orthogonalize(poison, honest)
    p = dense(poison)
    pp = inner(p, p)
    # a lone pattern no one resonates with: nothing of it enters
    assert shared_dense(props([honest, honest, poison])).keys() == dense(honest).keys()
    assert inner(shared_dense(props([honest, honest, poison])), p) == pytest.approx(0.0, abs=1e-6 * pp)
    # hidden inside a resonating delta: with two honest contributors it is projected away entirely
    carrier = Circuit(factors=combine([(honest, 1.0), (poison, 1.0)]), tier="", scope="")
    shared = shared_dense(props([honest, honest, carrier]))
    assert abs(inner(shared, p)) / pp == pytest.approx(0.0, abs=1e-5)
    # with one honest partner only, it leaks at most ½·w·‖Δ_honest‖ along the poison direction
    proposals = props([honest, carrier])
    result = resonate(proposals, S, GAIN, MAX_GAIN)
    leaked = abs(inner(shared_dense(proposals), p)) / pp**0.5
    h = inner(dense(honest), dense(honest)) ** 0.5
    assert 0 < leaked <= 0.5 * result.verdicts[0].weight * h + 1e-6


def test_circuits_resonate_only_where_their_gates_meet(base):
    """The same delta gated to two prompts no input reaches together is two agents' private patterns, not one
    shared pattern: neither supports the other. Gated to the same prompt (or ungated) they resonate."""
    from dynamiclora.gates import Gate

    _, (delta, *_) = base
    here, there = torch.zeros(8), torch.zeros(8)
    there[0] = 1.0

    def gated(feature: torch.Tensor) -> Circuit:
        return Circuit(factors=delta.factors, tier="", scope="", gate=Gate.single(feature, 0.4))

    apart = resonate(props([gated(here), gated(there)]), S, GAIN, MAX_GAIN)
    assert not any(v.enters for v in apart.verdicts) and float(apart.cosines[0, 1]) == 0.0
    together = resonate(props([gated(here), gated(here + 0.1)]), S, GAIN, MAX_GAIN)
    assert all(v.enters for v in together.verdicts) and float(together.cosines[0, 1]) == pytest.approx(1.0)
    assert all(v.enters for v in resonate(props([gated(here), delta]), S, GAIN, MAX_GAIN).verdicts)


def test_combine_equals_the_dense_sum(base):
    _, circuits = base
    coefficients = [0.7, -1.3, 2.0, 0.25]
    merged = dense(Circuit(factors=combine(list(zip(circuits, coefficients))), tier="", scope=""))
    for m in merged:
        naive = sum(k * c.delta(m).double() for c, k in zip(circuits, coefficients))
        torch.testing.assert_close(merged[m], naive, rtol=1e-5, atol=1e-8)


def test_gram_matches_dense_inner_products(base):
    _, circuits = base
    g = gram(circuits)
    for i, x in enumerate(circuits):
        for j, y in enumerate(circuits):
            assert float(g[i, j]) == pytest.approx(inner(dense(x), dense(y)), rel=1e-4)


# -- the sharing step of the tick on a tiny model ---------------------------------------------------------------


def team(config: DynamicsConfig | None = None):
    """Agents a, b, c of swarm team and x of another, with the gain law amplifying (γ = GAIN; the default is 0)."""
    dl = make_dl(config=DynamicLoRAConfig(dynamics=config or DynamicsConfig(tick_interval=0, resonance_gain=GAIN)))
    for name, swarm in (("a", "team"), ("b", "team"), ("c", "team"), ("x", "other")):
        dl.agent(name, swarm=swarm, domain="python")
    return dl


def persistent(dl, agent: str, circuit: Circuit) -> Circuit:
    """Place a circuit in an agent's tier as if it had been used in every tick of a full window there."""
    dl.add_circuit(f"agent:{agent}", circuit)
    window = dl.memory.window("agent")
    circuit.entered_tick = dl.tick_count - window
    circuit.series = [1] * window
    circuit.uses_this_tick = 1
    return circuit


def copy(c: Circuit) -> Circuit:
    return Circuit(factors={m: (a.clone(), b.clone()) for m, (a, b) in c.factors.items()}, tier="", scope="")


def test_consensus_keeps_contributors_outputs_and_shares_with_other_members(ids):
    dl = team()
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(7), magnitude=0.3)
    persistent(dl, "a", copy(delta))
    persistent(dl, "b", copy(delta))
    before = {n: dl.agent(n).logits(ids) for n in ("a", "b", "c", "x")}
    report = dl.tick()
    [record] = report.shared
    assert record["scope"] == "swarm:team" and all(p["entered"] for p in record["proposals"])
    [shared] = dl.hierarchy.scope("swarm:team").circuits.values()
    assert sorted(m["kind"] for m in dl.migrations() if m.get("kind") == "consensus") == ["consensus"] * 2
    for n in ("a", "b"):  # contributors: sum invariance through the residual
        torch.testing.assert_close(dl.agent(n).logits(ids), before[n], rtol=1e-4, atol=1e-4)
        [residual] = dl.hierarchy.scope(f"agent:{n}").circuits.values()
        assert residual.residual_of == "swarm:team"
    # another member of the swarm now runs with (1 + gain)·delta; the other swarm is untouched
    expected = make_dl()
    expected.agent("c", swarm="team", domain="python")
    expected.add_circuit("agent:c", Circuit(factors=delta.factors, tier="", scope="", scale=1 + GAIN))
    torch.testing.assert_close(dl.agent("c").logits(ids), expected.agent("c").logits(ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dl.agent("c").logits(ids), before["c"], atol=1e-3)
    torch.testing.assert_close(dl.agent("x").logits(ids), before["x"])
    # a residual is never proposed to the same scope again
    for _ in range(dl.memory.window("agent") + 2):
        for n in ("a", "b"):
            for c in dl.hierarchy.scope(f"agent:{n}").circuits.values():
                dl.memory.record_use(c)
        assert not dl.tick().shared


def test_a_members_own_copy_is_absorbed_and_its_outputs_do_not_change(ids):
    """c holds its own version of the pattern a and b bring in (resonating, not equal, not yet a proposal): when
    the swarm gains the shared circuit, c gives its copy up (the pattern is not carried twice) and runs as before."""
    dl = team()
    g = torch.Generator().manual_seed(7)
    delta, noise = random_circuit(dl, 4, g, magnitude=0.3), random_circuit(dl, 4, g, magnitude=0.3)
    persistent(dl, "a", copy(delta))
    persistent(dl, "b", copy(delta))
    own = Circuit(factors=combine([(delta, 0.6), (noise, 0.3)]), tier="", scope="")
    dl.add_circuit("agent:c", own)  # just learned: it has no window of residence, so it is not proposed
    before = dl.agent("c").logits(ids)
    [record] = dl.tick().shared
    assert [a["from"] for a in record["absorbed"]] == ["agent:c"] and record["absorbed"][0]["cosine"] >= S
    assert own.id not in dl.hierarchy.scope("agent:c").circuits
    torch.testing.assert_close(dl.agent("c").logits(ids), before, rtol=1e-4, atol=1e-4)


def test_two_patterns_entering_together_stay_two_shared_circuits(ids):
    """Two unrelated patterns both resonate in one tick: each becomes its own shared circuit (so each can move on
    by itself), together equal to what one combined circuit would be; contributors' outputs do not change."""
    dl = team()
    g = torch.Generator().manual_seed(7)
    first, second = random_circuit(dl, 4, g, magnitude=0.3), random_circuit(dl, 4, g, magnitude=0.3)
    for n in ("a", "b"):
        persistent(dl, n, copy(first))
        persistent(dl, n, copy(second))
    before = {n: dl.agent(n).logits(ids) for n in ("a", "b")}
    [record] = dl.tick().shared
    assert len(record["shared"]) == 2 and all(p["entered"] for p in record["proposals"])
    held = list(dl.hierarchy.scope("swarm:team").circuits.values())
    for pattern in (first, second):  # each shared circuit is (1 + gain) times exactly one of the patterns
        best = max(held, key=lambda c: inner(dense(c), dense(pattern)))
        expected = {m: (1 + GAIN) * v for m, v in dense(pattern).items()}
        torch.testing.assert_close(dense(best), expected, rtol=1e-4, atol=1e-5)
    for n in ("a", "b"):
        torch.testing.assert_close(dl.agent(n).logits(ids), before[n], rtol=1e-4, atol=1e-4)


def test_a_pattern_the_swarm_already_holds_is_absorbed_not_added_twice(ids):
    dl = team()
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(7), magnitude=0.3)
    held = dl.add_circuit("swarm:team", Circuit(factors=copy(delta).factors, tier="", scope="", scale=1.1))
    held.uses_this_tick = 1  # in use: it does not decay in this tick
    persistent(dl, "a", copy(delta))
    swarm_hash = dl.hierarchy.scope("swarm:team").content_hash()
    report = dl.tick()
    [record] = report.shared
    assert record["absorbed"] and not record["proposals"]
    assert dl.hierarchy.scope("swarm:team").content_hash() == swarm_hash  # nothing added twice
    assert not dl.hierarchy.scope("agent:a").circuits  # the copy was the shared pattern exactly: nothing left
    assert [m["kind"] for m in dl.migrations()] == ["absorbed"]
    torch.testing.assert_close(dl.agent("a").logits(ids), dl.agent("c").logits(ids))


def test_lone_pusher_never_reaches_the_swarm(ids):
    dl = team()
    poison = random_circuit(dl, 4, torch.Generator().manual_seed(9), magnitude=0.3)
    persistent(dl, "a", poison)
    before = dl.agent("c").logits(ids)
    for _ in range(3 * dl.memory.window("agent")):
        dl.memory.record_use(poison)
        report = dl.tick()
        assert all(not p["entered"] for r in report.shared for p in r["proposals"])
    assert not dl.hierarchy.scope("swarm:team").circuits
    torch.testing.assert_close(dl.agent("c").logits(ids), before)


def test_a_circuit_must_reside_a_window_in_its_tier_before_it_moves_up():
    dl = team()
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(7))
    for n in ("a", "b"):
        c = persistent(dl, n, copy(delta))
        c.entered_tick = dl.tick_count - 1  # it used to be persistent elsewhere, but only just arrived
    assert not dl.tick().shared


def test_shared_scopes_climb_to_domain_and_foundation():
    """Two swarms' resonating swarm circuits → their domain; two domains' → the foundation. (With the gain law
    amplifying, as the test was written: at γ = 0 the swarms keep no residual, and within these few ticks the
    domain window stays at window_min.)"""
    dl = make_dl(config=DynamicLoRAConfig(dynamics=DynamicsConfig(tick_interval=0, resonance_gain=GAIN)))
    for name, swarm, domain in (("a", "s1", "d1"), ("b", "s2", "d1"), ("c", "s3", "d2"), ("d", "s4", "d2")):
        dl.agent(name, swarm=swarm, domain=domain)
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(5))
    window = dl.memory.window("swarm")
    for swarm in ("s1", "s2", "s3", "s4"):
        c = copy(delta)
        dl.add_circuit(f"swarm:{swarm}", c)
        c.series, c.entered_tick, c.uses_this_tick = [1] * window, dl.tick_count - window, 1
    report = dl.tick()
    assert sorted(r["scope"] for r in report.shared) == ["domain:d1", "domain:d2"]
    window = dl.memory.window("domain")  # now measured: at least the swarm tier's time scale
    assert window > dl.config.dynamics.window_min
    for c in [c for d in ("d1", "d2") for c in dl.hierarchy.scope(f"domain:{d}").circuits.values()]:
        c.series, c.uses_this_tick = [1] * window, 1
        c.entered_tick -= window
    report = dl.tick()
    assert [r["scope"] for r in report.shared] == ["foundation"]
    assert len(dl.hierarchy.scope("foundation").circuits) == 1


def test_a_swarm_lives_in_one_domain():
    dl = make_dl()
    dl.agent("a", swarm="team", domain="python")
    with pytest.raises(ValueError, match="swarm 'team' belongs to domain 'python'"):
        dl.agent("b", swarm="team", domain="rust")


# -- the seed's team scenario ------------------------------------------------------------------------------------


def assert_scenario(checks: dict) -> None:
    assert checks["a_missed_then_hit"] and checks["a_screened"] and checks["a_migrated_to_agent"], checks
    assert checks["b_resonated"] and checks["swarm_consolidated"] and checks["entry_evicted"], checks
    assert checks["inherited"] == {"cy": True, "dee": True, "eve": True}, checks
    assert checks["other_swarm_inherited"] is False, checks


def test_team_scenario_on_a_tiny_model(tmp_path):
    from rich.console import Console

    from dynamiclora.demo import demo_model
    from dynamiclora.demo_team import run_team

    checks = run_team(demo_model(fast=True), tmp_path, Console(file=open(tmp_path / "out.txt", "w")))
    assert_scenario(checks)
    assert checks["plot"].exists()


@pytest.mark.slow
def test_team_scenario_on_the_default_model(tmp_path):
    from rich.console import Console

    from dynamiclora import DynamicLoRA
    from dynamiclora.demo_team import run_team

    dl = DynamicLoRA.default(progress=False)
    assert_scenario(run_team(dl, tmp_path, Console(file=open(tmp_path / "out.txt", "w"))))


def test_consensus_state_survives_save_and_load(tmp_path):
    from dynamiclora import DynamicLoRA
    from dynamiclora.testing import tiny_model

    dl = team()
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(7), magnitude=0.3)
    persistent(dl, "a", copy(delta))
    persistent(dl, "b", copy(delta))
    dl.tick()
    dl.save(tmp_path / "s")
    model, tokenizer = tiny_model("llama")
    again = DynamicLoRA.load(tmp_path / "s", model=model, tokenizer=tokenizer)
    for key, scope in dl.hierarchy.scopes.items():
        assert again.hierarchy.scopes[key].content_hash() == scope.content_hash()
    [residual] = again.hierarchy.scope("agent:a").circuits.values()
    assert residual.residual_of == "swarm:team"
    assert again.memory.sharing.log == dl.memory.sharing.log


def test_deleting_an_agent_drops_its_own_pending_proposals_and_its_share_of_others():
    dl = team()
    g = torch.Generator().manual_seed(3)
    mine, ours = random_circuit(dl, 2, g), random_circuit(dl, 2, g)
    mine.origin_agents, ours.origin_agents = ["a"], ["a", "b"]
    dl.memory.sharing.propose(Proposal(mine, frozenset({"a"}), "", 0.9, False, "swarm:team"))
    dl.memory.sharing.propose(Proposal(ours, frozenset({"a", "b"}), "", 0.9, False, "swarm:team"))
    report = dl.delete_agent("a")
    assert report["pending_proposals"] == 1
    [left] = dl.memory.sharing.pending
    assert left.circuit is ours and left.contributors == frozenset({"b"})
