"""Memory dynamics: detector, phases and hysteresis, decay and forgetting, migration, bandwidth, protection,
homeostasis, time scales, persistence mid-stream."""

from __future__ import annotations

import random

import pytest
import torch

from dynamiclora import DynamicLoRA, DynamicLoRAConfig
from dynamiclora.config import DynamicsConfig, LearningConfig
from dynamiclora.dynamics import persistence

from .conftest import make_dl, random_circuit

W, BLOCKS = 32, 4


def detect(series):
    return persistence(series, W, BLOCKS, min_coverage=1.0, min_autocorrelation=0.3)


# -- the detector ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("period", [2, 3, 4, 6, 8])
def test_recurring_pattern_qualifies(period):
    series = [1 if t % period == 0 else 0 for t in range(W)]
    p = detect(series)
    assert p.qualifies and p.lag == period and p.coverage == 1.0


def test_same_uses_in_a_burst_do_not_qualify():
    for period in (2, 3, 4, 8):
        uses = W // period
        for start in (0, 5, W - uses):
            series = [1 if start <= t < start + uses else 0 for t in range(W)]
            assert not detect(series).qualifies, (period, start)


def test_random_noise_does_not_qualify():
    rng = random.Random(0)
    false_positives = 0
    trials = 2000
    for _ in range(trials):
        rate = rng.choice([0.1, 0.25, 0.33, 0.5])
        series = [1 if rng.random() < rate else 0 for _ in range(W)]
        false_positives += detect(series).qualifies
    assert false_positives / trials < 0.01  # measured: 0 in 2000 with this seed


def test_jittered_recurrence_still_qualifies():
    rng = random.Random(1)
    series = [0] * W
    for t in range(0, W, 4):
        series[min(W - 1, t + rng.choice([0, 0, 0, 1]))] = 1
    assert detect(series).coverage == 1.0  # recurs across the whole window; jitter may weaken the peak


def test_used_every_tick_qualifies_and_score_orders():
    assert detect([1] * W).qualifies
    assert detect([1] * W).score >= detect([1 if t % 4 == 0 else 0 for t in range(W)]).score


# -- ticks on a real model ---------------------------------------------------------------------------------
def dyn_dl(**dynamics) -> DynamicLoRA:
    cfg = DynamicLoRAConfig(
        dynamics=DynamicsConfig(tick_interval=0, **dynamics), learning=LearningConfig(steps_per_learn=2)
    )
    dl = make_dl(config=cfg)
    dl.agent("alice", swarm="backend", domain="python")
    return dl


def add_context(dl, n=1, seed=0, agent="alice"):
    g = torch.Generator().manual_seed(seed)
    return [dl.add_circuit(f"context:{agent}", random_circuit(dl, 4, g), pinned=False) for _ in range(n)]


def run_ticks(dl, circuits, pattern, ticks):
    """pattern(circuit_index, tick) -> used?"""
    reports = []
    for t in range(ticks):
        for i, c in enumerate(circuits):
            if pattern(i, t) and c.id in {x.id for x in dl.hierarchy.all_circuits()}:
                dl.memory.record_use(c)
        reports.append(dl.tick())
    return reports


def test_hysteresis_no_flapping_between_thresholds():
    dl = dyn_dl(theta_on=0.6, theta_off=0.2, decay=0.0, window_min=16)
    (c,) = add_context(dl)
    # u hovers around 0.4 (between the thresholds): the phase never changes from FREE
    run_ticks(dl, [c], lambda i, t: t % 5 in (0, 2), 40)
    assert c.phase == "FREE" and not [h for h in c.history if h["event"] == "phase"]
    # driven above theta_on it screens once; back to the middle band it stays screened
    run_ticks(dl, [c], lambda i, t: True, 10)
    assert c.phase == "SCREENED"
    run_ticks(dl, [c], lambda i, t: t % 5 in (0, 2), 30)
    assert c.phase == "SCREENED"
    assert len([h for h in c.history if h["event"] == "phase"]) == 1


def test_free_circuits_decay_and_are_forgotten_screened_survive():
    dl = dyn_dl(decay=0.1, forget_below=0.05)
    used, unused = add_context(dl, 2)
    reports = run_ticks(dl, [used, unused], lambda i, t: i == 0, 40)
    alive = {c.id for c in dl.hierarchy.all_circuits()}
    assert used.id in alive and used.phase == "SCREENED" and used.strength == pytest.approx(1.0)
    assert unused.id not in alive
    gone = [f for r in reports for f in r.forgotten]
    assert [f["circuit"] for f in gone] == [unused.id] and dl.forgotten()[0]["circuit"] == unused.id
    assert gone[0]["tick"] in range(25, 32)  # 0.9**29 < 0.05: about 29 unused ticks at 10% decay


def test_screened_circuit_decays_much_slower_when_unused():
    dl = dyn_dl(decay=0.1, screened_decay_ratio=0.02)
    screened, free = add_context(dl, 2)
    screened.phase = "SCREENED"
    screened.series = [1] * 8  # keeps u high for the first ticks of the window
    run_ticks(dl, [screened, free], lambda i, t: False, 5)
    assert screened.vigor > 0.98 and free.vigor == pytest.approx(0.9**5, rel=1e-6)
    assert screened.strength == 1.0 and free.strength == pytest.approx(
        0.7
    )  # acting strength: vigor rounded up to a step


def test_an_idle_gated_circuit_acts_whole_until_it_is_forgotten():
    """Disuse fades a learned (gated) circuit's vigor, but its outputs stay the learned ones, bit for bit and under
    the same hash, until it is forgotten; then the base model's come back. (An ungated one steps down: above.)"""
    dl = dyn_dl(decay=0.1, forget_below=0.05)
    alice, carol = dl.agent("alice"), dl.agent("carol", swarm="backend", domain="python")
    prompt = dl.encode("def get_alpha_port():")
    ids = torch.tensor([prompt + dl.encode(" return 'cedar'", special=False)])
    alice.learn("def get_alpha_port():", " return 'cedar'")
    (circuit,) = dl.hierarchy.all_circuits()
    assert circuit.gate is not None and circuit.tier == "context"
    learned, learned_hash = alice.logits(ids, route_tokens=len(prompt)), alice.snapshot().provenance_hash
    assert not torch.equal(learned, carol.logits(ids, route_tokens=len(prompt)))
    ticks = 0
    while dl.circuits(tier="context"):
        assert torch.equal(alice.logits(ids, route_tokens=len(prompt)), learned), f"moved at tick {ticks}"
        assert alice.snapshot().provenance_hash == learned_hash
        dl.tick()
        ticks += 1
    assert circuit.vigor < 0.05 and ticks in range(25, 32)  # faded at the FREE rate, then forgotten
    assert torch.equal(alice.logits(ids, route_tokens=len(prompt)), carol.logits(ids, route_tokens=len(prompt)))


def test_recurring_learning_migrates_and_preserves_the_owners_outputs():
    dl = dyn_dl(window_min=16, decay=0.0)  # no decay: the migration is the tick's only change
    alice = dl.agent("alice")
    ids = torch.tensor([dl.encode("def parse_json(text): return json.loads(text)")])
    migrated = []
    for t in range(40):
        if t % 2 == 0:
            alice.learn("def parse_json(text):", " return json.loads(text)")
        before = alice.logits(ids)
        report = dl.tick()
        if report.migrated:
            torch.testing.assert_close(alice.logits(ids), before, rtol=1e-4, atol=1e-4)  # sum invariance
            migrated += report.migrated
            break
    assert migrated and migrated[0]["from"] == "context:alice" and migrated[0]["to"] == "agent:alice"
    assert dl.migrations(agent="alice") == migrated
    c = dl.hierarchy.find_circuit(migrated[0]["circuit"])[1]
    assert c.tier == "agent" and any(h["event"] == "migrated" for h in c.history)
    # the pattern keeps being used where it now lives, and is not learned again into the context tier
    r = alice.learn("def parse_json(text):", " return json.loads(text)")
    assert r.circuit_id == c.id and not r.trained and len(dl.hierarchy.scope("context:alice")) == 0


def test_a_shared_circuit_that_claims_a_prompt_does_not_block_learning_another_answer():
    """A consensus circuit was never learned in this agent's stack, so it has no loss to compare with: it stops a
    learn only while the stack reproduces the completion. Ben's swarm holds alice's answer for the prompt; ben
    asking to learn that answer is a use, ben teaching another answer is learned into his context tier."""
    dl = dyn_dl()
    dl.agent("ben", swarm="backend", domain="python")
    prompt = "def parse_json(text):"
    learned = [dl.agent("alice").learn(prompt, " return json.loads(text)") for _ in range(12)]
    assert len({r.circuit_id for r in learned}) == 1
    c = dl.hierarchy.scope("context:alice").remove(learned[-1].circuit_id)
    c.last_loss = None  # as a consensus circuit: made in no one's stack
    dl.add_circuit("swarm:backend", c)
    answer = " return json.loads(text)"
    assert dl.agent("ben").generate(prompt, max_new_tokens=len(dl.encode(answer, special=False))).text == answer
    same = dl.agent("ben").learn(prompt, answer)
    assert same.circuit_id == c.id and not same.trained
    other = dl.agent("ben").learn(prompt, " return yaml.safe_load(text)")
    assert other.trained and other.circuit_id in dl.hierarchy.scope("context:ben").circuits


def test_burst_and_noise_do_not_migrate():
    dl = dyn_dl(window_min=16, decay=0.0)
    burst, noise = add_context(dl, 2)
    rng = random.Random(3)
    noise_ticks = {t for t in range(48) if rng.random() < 0.3}
    run_ticks(dl, [burst, noise], lambda i, t: (i == 0 and 10 <= t < 18) or (i == 1 and t in noise_ticks), 48)
    assert not dl.migrations()


def test_bandwidth_and_critical_bypass():
    dl = dyn_dl(window_min=16, bandwidth=2, decay=0.0)
    circuits = add_context(dl, 5)
    circuits[4].critical = True
    report = run_ticks(dl, circuits[:4], lambda i, t: t % 2 == 0, 1)[0]
    assert [m["circuit"] for m in report.migrated] == [circuits[4].id]  # critical: at once, outside the queue
    reports = run_ticks(dl, circuits[:4], lambda i, t: t % 2 == 0, 24)
    per_tick = [len(r.migrated) for r in reports]
    assert max(per_tick) <= 2 and sum(per_tick) == 4
    waited = next(r for r in reports if r.migrated)
    assert len(waited.queued) == 2  # the other two waited their turn, ordered by stability


def test_protection_keeps_a_screened_pattern_while_new_learning_goes_elsewhere():
    """Learning a new pattern moves a SCREENED pattern's logits less than an unprotected control (routing off:
    protection is what keeps ungated circuits apart; with routing the other pattern's circuit never acts here)."""
    drift = {}
    for protect in (True, False):
        dl = make_dl(
            config=DynamicLoRAConfig(
                dynamics=DynamicsConfig(tick_interval=0, protect_screened=protect),
                learning=LearningConfig(routing=False),
            )
        )
        alice = dl.agent("alice", swarm="s", domain="d")
        first = alice.learn("def parse_json(text):", " return json.loads(text)")
        for _ in range(2):
            alice.learn("def parse_json(text):", " return json.loads(text)")
        dl.hierarchy.find_circuit(first.circuit_id)[1].phase = "SCREENED"
        ids = torch.tensor([dl.encode("def parse_json(text): return json.loads(text)")])
        before = alice.logits(ids).log_softmax(-1)
        for _ in range(3):
            alice.learn("def parse_yaml(text):", " return yaml.safe_load(text)")
        after = alice.logits(ids).log_softmax(-1)
        drift[protect] = float((before.exp() * (before - after)).sum(-1).mean())  # KL(before || after)
    assert drift[True] < 0.5 * drift[False], drift


def flood(uses_per_pattern: int, regulate: bool, tier: str = "context") -> float:
    """Two novel patterns arrive every tick, each used in its first ``uses_per_pattern`` ticks and never again;
    returns the mean SCREENED fraction of the context tier after a warm-up."""
    dl = dyn_dl()
    if not regulate:
        dl.memory.homeostasis.update = lambda tier, phases: None
    g = torch.Generator().manual_seed(0)
    active, fractions = [], []
    for t in range(100):
        for _ in range(2):
            active.append([dl.add_circuit(f"{tier}:alice", random_circuit(dl, 2, g), pinned=False), uses_per_pattern])
        for item in active:
            dl.memory.record_use(item[0])
            item[1] -= 1
        active = [item for item in active if item[1] > 0]
        dl.tick()
        if t >= 50:
            members = [c for _, c in dl.memory.tier_circuits(tier)]
            fractions.append(sum(c.phase == "SCREENED" for c in members) / len(members))
    return sum(fractions) / len(fractions)


# crystallization pressure (long-used patterns in a tier they cannot migrate out of), amnesia pressure
@pytest.mark.parametrize("uses_per_pattern, tier", [(60, "agent"), (2, "context")])
def test_homeostasis_holds_the_screened_fraction_in_its_band_under_a_flood(uses_per_pattern, tier):
    from dynamiclora.dynamics.homeostasis import BAND

    regulated, fixed = flood(uses_per_pattern, True, tier), flood(uses_per_pattern, False, tier)
    assert BAND[0] - 0.05 <= regulated <= BAND[1] + 0.05, (regulated, fixed)
    assert not BAND[0] <= fixed <= BAND[1], (regulated, fixed)  # without regulation it leaves the band


def test_timescales_are_measured_not_configured():
    dl = dyn_dl(decay=0.2, window_min=16)
    circuits = add_context(dl, 3)
    run_ticks(dl, circuits, lambda i, t: i == 0 and t % 2 == 0, 40)
    scales = dl.timescales()
    assert scales["context"]["left"] >= 2 and scales["context"]["ticks"] is not None
    assert scales["context"]["window"] >= 8


def test_ticks_run_every_interval_and_state_survives_save_load(tmp_path):
    cfg = DynamicLoRAConfig(dynamics=DynamicsConfig(tick_interval=2), learning=LearningConfig(steps_per_learn=1))
    dl = make_dl(config=cfg)
    alice = dl.agent("alice", swarm="s", domain="d")
    for i in range(6):
        alice.learn("def f(x):", f" return x + {i % 2}")
    assert dl.tick_count == 3
    dl.save(tmp_path)
    again = DynamicLoRA.load(tmp_path, model=make_dl(config=cfg).model, tokenizer=dl.tokenizer)
    assert again.tick_count == 3 and again.timescales() == dl.timescales()
    for a, b in zip(sorted(again.circuits(), key=lambda r: r["id"]), sorted(dl.circuits(), key=lambda r: r["id"])):
        assert (a["phase"], a["series"], a["u"]) == (b["phase"], b["series"], b["u"])


def test_save_load_mid_stream_continues_identically(tmp_path):
    """Interrupting a stream with save -> load changes nothing: circuits, phases, series, hashes, logs."""
    cfg = DynamicLoRAConfig(
        dynamics=DynamicsConfig(tick_interval=3, window_min=8, blocks=4), learning=LearningConfig(steps_per_learn=2)
    )
    stream = [
        ("def parse_json(text):", " return json.loads(text)"),
        ("x = [", "1, 2, 3]"),
        ("def parse_json(text):", " return json.loads(text)"),
        ("class A:", " pass"),
        ("import os", "\nimport sys"),
    ] * 8

    def run(dl, items):
        alice = dl.agent("alice")
        for prompt, completion in items:
            alice.learn(prompt, completion)

    straight = make_dl(config=cfg)
    straight.agent("alice", swarm="s", domain="d")
    run(straight, stream)

    first = make_dl(config=cfg)
    first.agent("alice", swarm="s", domain="d")
    run(first, stream[:17])
    first.save(tmp_path)
    resumed = DynamicLoRA.load(tmp_path, model=make_dl(config=cfg).model, tokenizer=first.tokenizer)
    run(resumed, stream[17:])

    def state(dl):  # circuit ids are random (uuid4): compare everything else
        return sorted((c["tier"], c["phase"], c["series"], c["scale"], c["label"]) for c in dl.circuits())

    def log(entries):
        return [{k: v for k, v in e.items() if k != "circuit"} for e in entries]

    assert state(resumed) == state(straight)
    assert resumed.snapshot("alice").provenance_hash == straight.snapshot("alice").provenance_hash
    assert log(resumed.migrations()) == log(straight.migrations())
    assert log(resumed.forgotten()) == log(straight.forgotten())


def test_timescales_come_out_ordered_and_separated_across_the_five_tiers():
    """A team stream (bench/tiers.py): patterns of four breadths recur at periods 2-4 among one-off sessions.
    Nothing sets a tier's time scale; measured over 3 runs: context 42, agent 133, swarm 174, domain 288,
    foundation >= 380 ticks (nothing ever left it)."""
    from dynamiclora.bench.tiers import SEPARATION, tier_timescales, timescale_checks

    result = tier_timescales(600)
    [run] = result["runs"]
    scales = run["per_tier"]
    assert all(timescale_checks(result).values()), run["ratios"]
    assert all(r >= SEPARATION for r in run["ratios"].values())
    assert scales["foundation"]["lower_bound"] and scales["foundation"]["circuits"] >= 1  # arrived, never left
    assert not any(scales[t]["lower_bound"] for t in ("context", "agent", "swarm", "domain"))
    # detector windows are derived, not configured: each at least the faster tier's measured scale
    for slow, fast in (("agent", "context"), ("swarm", "agent"), ("domain", "swarm")):
        assert scales[slow]["window"] >= scales[fast]["ticks"]


def test_mean_residence_counts_the_circuits_still_in_a_tier():
    from dynamiclora.dynamics.timescales import mean_residence

    assert mean_residence([10, 20], []).ticks == 15
    assert mean_residence([10, 20], [100]).ticks == 65  # the one that stays 100 ticks and counting makes it slow
    empty = mean_residence([], [7, 3])
    assert empty.lower_bound and empty.ticks == 7
    assert mean_residence([], []).ticks is None


def test_regulation_relaxes_back_to_the_configured_values_inside_the_band():
    from dynamiclora.dynamics.homeostasis import BAND, Homeostasis

    cfg = DynamicsConfig()
    reg = Homeostasis(cfg).tiers["context"]
    for _ in range(40):
        reg.adapt(0.0)  # amnesic: easier to screen, slower fading, shorter horizon
    assert reg.decay < cfg.decay and reg.theta_on < cfg.theta_on and reg.horizon < 1.0
    for _ in range(200):
        reg.adapt((BAND[0] + BAND[1]) / 2)
    assert (reg.theta_on, reg.theta_off, reg.decay, reg.horizon) == pytest.approx(reg.initial)
