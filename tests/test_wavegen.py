"""WaveGen: provenance-exact lookup, tiered invalidation, eviction, hit rates, consolidation, verification."""

from __future__ import annotations

import random

import pytest
import torch

from dynamiclora import DynamicLoRAConfig, GenerationConfig, WaveGenConfig
from dynamiclora.config import CACHE_TIERS
from dynamiclora.hierarchy import AgentInfo
from dynamiclora.wavegen import CacheEntry, CacheTier, TieredCache, accept, extract
from dynamiclora.wavegen.signature import depends_on, prompt_key

from .conftest import make_dl, random_circuit

# tiny random models are never confident: open the coherence gate so that their generations are stored
OPEN = {"min_coherence": 0.0, "learn_from_generations": False}
TEAM = {"a1": ("s1", "d1"), "a2": ("s1", "d1"), "b1": ("s2", "d1"), "c1": ("s3", "d2")}


def wavegen_dl(arch: str = "llama", **wavegen):
    dl = make_dl(arch, DynamicLoRAConfig(wavegen={**OPEN, **wavegen}, dynamics={"tick_interval": 0}))
    for agent_id, (swarm, domain) in TEAM.items():
        dl.agent(agent_id, swarm=swarm, domain=domain)
    return dl


def prompts(n: int, seed: int = 0) -> list[str]:
    words = ["def", "class", "return", "import", "json", "parse", "self", "value", "list", "for", "in", "if"]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(n)]


def uncached(dl, agent_id: str, prompt: str, **overrides) -> list[int]:
    return dl.generate_batch([(agent_id, prompt)], **overrides)[0].token_ids


# -- provenance: a stale entry is never served --------------------------------------------------------------
def test_a_stale_entry_is_never_served_after_a_scope_it_depends_on_changes():
    """Random interleavings of generations and scope changes: every hit was stored under the very contents of
    every scope its tier depends on."""
    dl = wavegen_dl(semantic_lookup=False)
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    pool = prompts(8, seed=1)
    askers = [["a1"], ["a1", "a2"], ["a1", "b1"], list(TEAM)]  # prompt i is asked by askers[i % 4]: every tier
    stored: dict[str, dict[str, str]] = {}  # entry id -> the hashes of its scopes when it was stored
    hits = {t: 0 for t in CACHE_TIERS}
    scopes = [str(k) for k in dl.hierarchy.scopes]
    for step in range(200):
        if rng.random() < 0.15:  # change one scope's weights (any tier, context included)
            scope = rng.choice(scopes)
            dl.add_circuit(scope, random_circuit(dl, 2, g, magnitude=0.02))
            continue
        i = rng.randrange(len(pool))
        agent_id, prompt = rng.choice(askers[i % 4]), pool[i]
        before = {e.id for e in dl.wavegen.cache.entries()}
        result = dl.agent(agent_id).generate(prompt, max_new_tokens=4, mode="jump")
        assert result.token_ids == uncached(dl, agent_id, prompt, max_new_tokens=4), f"step {step}: not exact"
        if result.cache == "miss":
            for e in dl.wavegen.cache.entries():
                if e.id not in before:
                    stored[e.id] = {s: dl.hierarchy.scope(s).content_hash() for s in e.scopes()}
        else:
            hits[result.cache] += 1
            info = dl.hierarchy.agent(agent_id)
            entry = next(
                e
                for e in dl.wavegen.cache.entries()
                if e.prompt_key == prompt_key(dl.encode(prompt))
                and e.tier == result.cache
                and all(s in [str(k) for k in info.stack()] for s in e.scopes())
            )
            now = {s: dl.hierarchy.scope(s).content_hash() for s in entry.scopes()}
            assert now == stored[entry.id], f"step {step}: stale {result.cache} entry served"
    assert sum(hits.values()) > 20 and all(hits.values()), hits  # the property was exercised on every tier


def test_changing_only_a_context_tier_keeps_entries_and_verify_still_matches_uncached():
    dl = wavegen_dl()
    a = dl.agent("a1")
    a.generate("def parse", max_new_tokens=6)
    dl.add_circuit("context:a1", random_circuit(dl, 4, torch.Generator().manual_seed(0), magnitude=0.3))
    again = a.generate("def parse", max_new_tokens=6)
    assert again.cache == "agent"  # context changes invalidate nothing (the seed's rule) ...
    assert again.token_ids == uncached(dl, "a1", "def parse", max_new_tokens=6)  # ... and verify keeps it exact


# -- tiered invalidation -------------------------------------------------------------------------------------
def entry(tier: str, agent: str, key: str = "k") -> CacheEntry:
    swarm, domain = TEAM[agent]
    return CacheEntry(tier, key, f"{tier}-{agent}", [1], [2], "x", agent, swarm, domain, "greedy", "r", 1.0)


STORED = {("foundation", "a1")} | {(t, a) for t in CACHE_TIERS[1:] for a in ("a1", "b1", "c1")}


@pytest.mark.parametrize(
    ("changed", "survivors"),
    [
        ("foundation", set()),
        ("domain:d1", {("foundation", "a1"), ("domain", "c1"), ("swarm", "c1"), ("agent", "c1")}),
        ("swarm:s1", STORED - {("swarm", "a1"), ("agent", "a1")}),
        ("agent:a1", STORED - {("agent", "a1")}),
        ("context:a1", STORED),
    ],
)
def test_tiered_invalidation_follows_the_seed_rules(changed, survivors):
    cache = TieredCache(WaveGenConfig())
    for tier, agent in STORED:
        cache.store(entry(tier, agent))
    cache.invalidate(changed)
    assert {(e.tier, e.agent) for e in cache.entries()} == survivors


def test_sync_invalidates_on_content_change_only():
    dl = wavegen_dl()
    a = dl.agent("a1")
    a.generate("def parse", max_new_tokens=4)
    dl.wavegen.cache.sync(dl.hierarchy)
    dl.hierarchy.scope("agent:a1").touch()  # a new version with the same content
    assert dl.wavegen.cache.sync(dl.hierarchy) == {}
    dl.add_circuit("agent:a1", random_circuit(dl, 2, torch.Generator().manual_seed(1)))
    assert dl.wavegen.cache.sync(dl.hierarchy) == {"agent:a1": 1}
    assert not dl.wavegen.cache.entries()


# -- eviction ------------------------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used_entry():
    tier = CacheTier("agent", 3, "lru", 0.5, hit_weight=64)
    entries = [entry("agent", "a1", key=f"k{i}") for i in range(4)]
    for clock, e in enumerate(entries[:3]):
        tier.put(e, clock)
    tier.touch(entries[0], 10)  # k0 used again: k1 is now the oldest
    evicted = tier.put(entries[3], 11)
    assert [e.prompt_key for e in evicted] == ["k1"]
    assert set(tier.entries) == {entries[i].id for i in (0, 2, 3)}


def test_weighted_lru_keeps_proven_entries_that_plain_lru_would_drop():
    def run(policy: str) -> set[str]:
        tier = CacheTier("agent", 3, policy, 0.5, hit_weight=64)
        proven = entry("agent", "a1", key="proven")
        tier.put(proven, 0)
        proven.hits = 5
        tier.touch(proven, 1)  # five hits long ago
        for clock in range(2, 10):  # a stream of one-offs
            tier.put(entry("agent", "a1", key=f"once{clock}"), clock)
        return {e.prompt_key for e in tier.entries.values()}

    assert "proven" not in run("lru")
    assert "proven" in run("weighted_lru")
    assert len(run("weighted_lru")) == 3


# -- hit rates, universality ---------------------------------------------------------------------------------
def test_hit_rate_arithmetic_of_the_seed_example():
    """Requests 1-5 of one prompt: a miss that stores, then four hits: hit rate 4/5."""
    dl = wavegen_dl()
    a = dl.agent("a1")
    served = [a.generate("import json\ndef parse", max_new_tokens=4).cache for _ in range(5)]
    assert served == ["miss", "agent", "agent", "agent", "agent"]
    (e,) = dl.wavegen.cache.entries()
    assert (e.hits, e.lookups, e.hit_rate) == (4, 5, 0.8)
    assert dl.cache_statistics()["hit_rate"] == 0.8


def test_store_tier_follows_universality_and_swarm_entries_are_shared():
    dl = wavegen_dl()
    assert dl.agent("a1").generate("def parse", max_new_tokens=4).cache == "miss"  # stored for a1 alone
    assert dl.agent("a2").generate("def parse", max_new_tokens=4).cache == "miss"  # a second agent of s1: swarm
    assert {e.tier for e in dl.wavegen.cache.entries()} == {"agent", "swarm"}
    dl.agent("a3", swarm="s1", domain="d1")
    assert dl.agent("a3").generate("def parse", max_new_tokens=4).cache == "swarm"  # new agent of s1: shared hit
    assert dl.agent("b1").generate("def parse", max_new_tokens=4).cache == "miss"  # s2: no access; 2 swarms
    assert dl.agent("c1").generate("def parse", max_new_tokens=4).cache == "miss"  # d2: 2 domains now
    tiers = sorted(e.tier for e in dl.wavegen.cache.entries())
    assert tiers == ["agent", "domain", "foundation", "swarm"]


def test_store_tier_thresholds_are_configurable():
    cache = TieredCache(WaveGenConfig(swarm_min_agents=3))
    for agent in ("a1", "a2"):
        cache.record_request("p", AgentInfo(agent, *TEAM[agent]))
    assert cache.store_tier("p", AgentInfo("a1", *TEAM["a1"])) == "agent"


def test_coherence_gate_keeps_incoherent_trajectories_out():
    dl = wavegen_dl(min_coherence=1.0)
    r = dl.agent("a1").generate("def parse", max_new_tokens=4)
    assert r.cache == "miss" and 0 < r.coherence < 1
    assert not dl.wavegen.cache.entries()


# -- serving: jump and verify --------------------------------------------------------------------------------
def test_jump_returns_the_cached_tokens_without_running_the_model(monkeypatch):
    dl = wavegen_dl()
    a = dl.agent("a1")
    first = a.generate("def parse", max_new_tokens=8)

    def fail(*args, **kwargs):
        raise AssertionError("the model ran on a jump hit")

    monkeypatch.setattr(dl.model, "forward", fail)
    hit = a.generate("def parse", max_new_tokens=8, mode="jump")
    assert hit.cache == "agent" and hit.token_ids == first.token_ids and hit.accepted_tokens == 8


def test_verify_equals_uncached_greedy_after_the_context_tier_changed():
    """Many prompts cached, then the context tier learns: verified output equals uncached greedy decoding."""
    dl = wavegen_dl(semantic_lookup=False)
    a = dl.agent("a1")
    pool = prompts(24, seed=5)
    for p in pool:
        a.generate(p, max_new_tokens=10)
    # change the context tier (context changes invalidate nothing): some cached drafts are now partly wrong
    dl.add_circuit("context:a1", random_circuit(dl, 4, torch.Generator().manual_seed(0), magnitude=0.02))
    partial = full = 0
    for p in pool:
        r = a.generate(p, max_new_tokens=10)
        assert r.cache == "agent"
        assert r.token_ids == uncached(dl, "a1", p, max_new_tokens=10), p
        partial += r.accepted_tokens < r.draft_tokens
        full += r.accepted_tokens == r.draft_tokens
    assert partial >= 3 and full >= 3, (partial, full)  # both paths of verification ran


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_verify_handles_longer_budgets_than_the_draft(arch):
    dl = wavegen_dl(arch, semantic_lookup=False)
    a = dl.agent("a1")
    a.generate("class Parser", max_new_tokens=5)
    r = a.generate("class Parser", max_new_tokens=12)  # draft of 5, then 7 more decoded from the kept cache
    assert r.draft_tokens == 5 and r.accepted_tokens == 5
    assert r.token_ids == uncached(dl, "a1", "class Parser", max_new_tokens=12)


def test_accept_keeps_the_sampling_distribution():
    """Speculative acceptance of a point-mass draft: each output position is distributed exactly as p."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g) * 1.5
    draft = [int(logits[0].argsort()[-2]), int(logits[1].argmax())]  # a likely-but-not-best first draft token
    cfg = GenerationConfig(temperature=1.0)
    p = logits.softmax(-1)
    n = 20000
    first = torch.zeros(6)
    second_given_draft = torch.zeros(6)
    for _ in range(n):
        k, nxt = accept(logits, draft, cfg, g)
        out = draft[:k] + [nxt]
        first[out[0]] += 1
        if out[0] == draft[0] and len(out) > 1:
            second_given_draft[out[1]] += 1
    tv_first = 0.5 * (first / n - p[0]).abs().sum()
    tv_second = 0.5 * (second_given_draft / second_given_draft.sum() - p[1]).abs().sum()
    assert tv_first < 0.02 and tv_second < 0.03, (tv_first, tv_second)


def test_accept_greedy_keeps_the_agreeing_prefix():
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert accept(logits, [1, 0], GenerationConfig()) == (2, 2)
    assert accept(logits, [1, 2], GenerationConfig()) == (1, 0)
    assert accept(logits, [0, 0], GenerationConfig()) == (0, 1)
    with pytest.raises(ValueError, match="rows of logits"):
        accept(logits, [1], GenerationConfig())


def test_verified_sampling_through_the_controller_matches_the_model_distribution():
    dl = wavegen_dl(semantic_lookup=False)
    a = dl.agent("a1")
    cfg = {"temperature": 1.0, "top_k": 4, "max_new_tokens": 1}
    a.generate("def parse", **cfg)  # one cached (sampled) token
    ids = torch.tensor([dl.encode("def parse")])
    p = dl.forward(["a1"], ids)[0][0, -1].float()
    top = p.topk(4)
    target = torch.zeros_like(p).scatter(0, top.indices, top.values.softmax(-1))
    n, counts = 600, torch.zeros_like(p)
    for _ in range(n):
        r = a.generate("def parse", **cfg)
        assert r.cache == "agent"
        counts[r.token_ids[0]] += 1
    assert 0.5 * (counts / n - target).abs().sum() < 0.08


# -- semantic lookup -----------------------------------------------------------------------------------------
def test_semantic_hits_are_verified_and_never_serve_a_rejected_draft():
    dl = wavegen_dl(semantic_threshold=0.5)
    a = dl.agent("a1")
    pool = prompts(10, seed=7)
    for p in pool:
        a.generate(p, max_new_tokens=8)
    semantic = rejected = 0
    for p in pool:
        for variant in (p + " not", "not " + p, p + " self"):
            for mode in ("verify", "jump"):
                r = a.generate(variant, max_new_tokens=8, mode=mode)
                if r.cache.startswith("semantic"):
                    semantic += 1
                    rejected += r.accepted_tokens < r.draft_tokens
                assert r.token_ids == uncached(dl, "a1", variant, max_new_tokens=8)
    assert semantic >= 10 and rejected >= 1, (semantic, rejected)


def test_semantic_lookup_is_restricted_to_equal_provenance():
    dl = wavegen_dl(semantic_threshold=0.0)
    dl.agent("a1").generate("def parse", max_new_tokens=4)
    r = dl.agent("b1").generate("def parse value", max_new_tokens=4)  # other swarm: a1's entry is not visible
    assert r.cache == "miss"


# -- consolidation -------------------------------------------------------------------------------------------
def practised(dl, agent_id: str, prompt: str, completion: str, calls: int = 8):
    agent = dl.agent(agent_id)
    for _ in range(calls):
        agent.learn(prompt, completion)
        if uncached(dl, agent_id, prompt, max_new_tokens=12) == dl.encode(completion, special=False) + [
            dl.tokenizer.eos_token_id
        ]:
            break
    return agent


def test_consolidation_internalizes_verifies_then_evicts():
    dl = wavegen_dl()
    prompt, completion = "import json\ndef parse", " return json.loads(text)"
    a = practised(dl, "a1", prompt, completion)
    results = [a.generate(prompt, max_new_tokens=12) for _ in range(5)]  # miss, then four hits: 4/5 >= 0.5
    assert [r.cache for r in results] == ["miss"] + ["agent"] * 4
    (e,) = dl.wavegen.cache.entries()
    without_context = dl.generate_ids(
        ["a1"], [dl.encode(prompt)], GenerationConfig(max_new_tokens=12), without=("context",)
    )
    assert without_context[0].tokens[0] != e.tokens  # the context tier is what produces it so far
    report = dl.tick()
    (record,) = report.consolidated
    assert record["outcome"] == "internalized" and record["scope"] == "agent:a1", record
    assert not dl.wavegen.cache.entries()  # evicted only after the check
    (circuit,) = dl.circuits(scope="agent:a1")
    assert circuit["history"][0]["event"] == "consolidated" and circuit["extracted"]["neurons"] >= 0
    produced = dl.generate_ids(["a1"], [dl.encode(prompt)], GenerationConfig(max_new_tokens=12), without=("context",))
    assert produced[0].tokens[0] == e.tokens  # the agent tier alone now produces it, uncached
    assert dl.migrations()[-1]["kind"] == "consolidation"


def test_failed_internalization_is_logged_and_the_entry_kept():
    dl = wavegen_dl(internalize_steps=1)
    prompt, completion = "import json\ndef parse", " return json.loads(text)"
    a = practised(dl, "a1", prompt, completion)
    for _ in range(5):
        a.generate(prompt, max_new_tokens=12)
    (record,) = dl.tick().consolidated
    assert record["outcome"] == "failed" and "steps" in record["reason"]
    (e,) = dl.wavegen.cache.entries()
    assert e.failures == 1 and e.retry_after == e.lookups + dl.config.wavegen.min_lookups
    assert not dl.circuits(scope="agent:a1")  # nothing half-done stays behind
    assert dl.tick().consolidated == []  # not retried before more lookups


def test_entries_below_threshold_or_lookups_are_not_consolidated():
    dl = wavegen_dl()
    a = dl.agent("a1")
    for _ in range(3):
        a.generate("def parse", max_new_tokens=4)  # 2/3 but only 3 lookups (< min_lookups = 5)
    assert dl.tick().consolidated == []
    assert len(dl.wavegen.cache.entries()) == 1


# -- extraction ----------------------------------------------------------------------------------------------
def test_extraction_matches_a_hand_computed_example():
    # layer "x" (4 neurons) feeds layer "y" (3 neurons) through W_x (3 x 4); "y" feeds "z" (2 neurons) via W_y.
    big = 10.0
    acts = {
        "x": torch.tensor([[0.0] * 9 + [big], [0.0] * 10]),  # 10 neurons, neuron 9 active at step 0
        "y": torch.tensor([[0.0] * 9 + [big]]),  # neuron 9 active
        "z": torch.tensor([[big] + [0.0] * 9]),  # neuron 0 active
    }
    w_x = torch.zeros(10, 10)
    w_x[9, 9] = 0.5  # x9 -> y9 strong
    w_y = torch.zeros(10, 10)
    w_y[0, 9] = -0.2  # y9 -> z0 strong (magnitude counts)
    w_y[1, 9] = 0.05  # below the 0.1 threshold
    got = extract(acts, {"x": w_x, "y": w_y}, ["x", "y", "z"], weight_threshold=0.1, min_size=3)
    assert got.nodes == [("x", 9), ("y", 9), ("z", 0)]
    assert got.edges == [("x", 9, "y", 9, 0.5), ("y", 9, "z", 0, pytest.approx(-0.2))]
    assert len(extract(acts, {"x": w_x, "y": w_y}, ["x", "y", "z"], 0.1, min_size=4)) == 0  # too small


def test_trajectories_record_top_k_ranks_and_activations():
    from dynamiclora.wavegen import Recorder

    dl = wavegen_dl()
    chain = dl.wavegen.chain
    assert chain and all(n in dl.layers for n in chain)
    recorder = Recorder([dl.encode("def parse")], top_k=3, modules={n: dl.layers[n] for n in chain[:2]})
    with recorder.hooks():
        dl.generate_ids(["a1"], [dl.encode("def parse")], GenerationConfig(max_new_tokens=5), observer=recorder)
    (traj,) = recorder.trajectories
    assert len(traj.steps) == 5 and all(s.rank == 0 for s in traj.steps)  # greedy picks rank 0
    assert all(s.top_ids[0] == s.token_id and len(s.top_logits) == 3 for s in traj.steps)
    assert set(traj.steps[0].activations) == set(chain[:2])
    assert 0 < traj.coherence() <= 1


# -- persistence ---------------------------------------------------------------------------------------------
def test_cache_state_survives_save_and_load(tmp_path):
    from dynamiclora import DynamicLoRA

    dl = wavegen_dl()
    a = dl.agent("a1")
    for _ in range(3):
        a.generate("def parse", max_new_tokens=6)
    dl.save(tmp_path)
    loaded = DynamicLoRA.load(tmp_path, model=dl.model, tokenizer=dl.tokenizer)
    (e,) = loaded.wavegen.cache.entries()
    assert (e.hits, e.lookups) == (2, 3) and e.vector is not None
    r = loaded.agent("a1").generate("def parse", max_new_tokens=6)
    assert r.cache == "agent" and e.hit_rate == 0.75
    assert loaded.cache_statistics()["lookups"] == 4


def test_changes_made_before_a_restart_invalidate_on_load(tmp_path):
    from dynamiclora import DynamicLoRA

    dl = wavegen_dl()
    dl.agent("a1").generate("def parse", max_new_tokens=6)
    dl.save(tmp_path)
    dl.add_circuit("agent:a1", random_circuit(dl, 2, torch.Generator().manual_seed(2)))
    dl.save(tmp_path)  # the entry was stored before the change; the saved hashes say so
    loaded = DynamicLoRA.load(tmp_path, model=dl.model, tokenizer=dl.tokenizer)
    assert not loaded.wavegen.cache.entries()


def test_every_tier_depends_on_itself_and_the_slower_ones():
    assert depends_on("foundation") == ("foundation",)
    assert depends_on("agent") == ("foundation", "domain", "swarm", "agent")


def test_a_seed_names_the_sampled_tokens_alone_in_a_batch_and_through_the_cache():
    """Sampling with a seed: a row draws from its own generator, so its tokens are the same alone, beside other
    rows, served from the cache (jump or verified draft) or decoded, and another seed is never served its entry."""
    dl = wavegen_dl(semantic_threshold=0.0)
    sampled = {"temperature": 1.0, "max_new_tokens": 10, "stop_at_eos": False}
    alone = {
        seed: dl.generate_batch([("a1", "def parse(text):")], seed=seed, **sampled)[0].token_ids for seed in (5, 6)
    }
    assert alone[5] != alone[6]
    batch = dl.generate_batch([("b1", "import os"), ("a1", "def parse(text):"), ("c1", "x = [")], seed=5, **sampled)
    assert batch[1].token_ids == alone[5]  # batch-mates do not move a row's draws
    a = dl.agent("a1")
    first = a.generate("def parse(text):", seed=5, **sampled)
    assert first.cache == "miss" and first.token_ids == alone[5]
    for mode in ("jump", "verify"):
        again = a.generate("def parse(text):", seed=5, mode=mode, **sampled)
        assert again.cache != "miss" and again.token_ids == alone[5], (mode, again.cache)
    other = a.generate("def parse(text):", seed=6, mode="jump", **sampled)
    assert other.token_ids == alone[6]  # not seed 5's entry
    near = a.generate("def parse(text): ", seed=5, mode="verify", **sampled)  # a semantic draft: seed 5's entry
    uncached = a.generate("def parse(text): ", seed=5, use_cache=False, **sampled)
    assert near.cache.startswith("semantic") and near.token_ids == uncached.token_ids, near.cache
