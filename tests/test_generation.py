"""Generation through the stack: KV-cached == recomputed, batched == alone, sampling, limits."""

from __future__ import annotations

import pytest
import torch

from dynamiclora import PromptTooLongError

from .conftest import populate

TEAM = {"alice": ("backend", "python"), "bob": ("backend", "python"), "carol": ("frontend", "python")}
PROMPTS = ["def parse_json(text):", "import os\n", "class Config:\n    def __init__(self", "x"]


def test_kv_cached_greedy_equals_recomputed(any_dl):
    populate(any_dl, TEAM, rank=4)
    requests = [(a, p) for a in TEAM for p in PROMPTS]
    cached = any_dl.generate_batch(requests, max_new_tokens=12, stop_at_eos=False)
    recomputed = any_dl.generate_batch(requests, max_new_tokens=12, stop_at_eos=False, use_kv_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    assert all(len(r.token_ids) == 12 for r in cached)


def test_batched_generation_equals_each_request_alone(any_dl):
    """Different agents, swarms and prompt lengths (left padding) in one batch give what each gives alone."""
    populate(any_dl, TEAM, rank=4)
    requests = [("alice", PROMPTS[0]), ("carol", PROMPTS[1]), ("bob", PROMPTS[2]), ("carol", PROMPTS[3])]
    batched = any_dl.generate_batch(requests, max_new_tokens=10, stop_at_eos=False)
    for (agent, prompt), result in zip(requests, batched):
        alone = any_dl.agent(agent).generate(prompt, max_new_tokens=10, stop_at_eos=False)
        assert result.token_ids == alone.token_ids
        assert result.snapshot_hash == alone.snapshot_hash


def test_circuits_change_generation(dl):
    dl.agent("alice", swarm="s", domain="d")
    before = dl.agent("alice").generate(PROMPTS[0], max_new_tokens=10, stop_at_eos=False).token_ids
    populate(dl, {"alice": ("s", "d")}, rank=8)
    for c in dl.hierarchy.all_circuits():
        c.scale = 20.0
    for s in dl.hierarchy.scopes.values():
        s.touch()
    after = dl.agent("alice").generate(PROMPTS[0], max_new_tokens=10, stop_at_eos=False).token_ids
    assert before != after


def test_sampling_is_seeded_and_varies(dl):
    populate(dl, TEAM)
    dl.generator.manual_seed(7)
    a = dl.agent("alice").generate(PROMPTS[0], temperature=1.0, max_new_tokens=16, stop_at_eos=False).token_ids
    dl.generator.manual_seed(7)
    b = dl.agent("alice").generate(PROMPTS[0], temperature=1.0, max_new_tokens=16, stop_at_eos=False).token_ids
    c = dl.agent("alice").generate(PROMPTS[0], temperature=1.0, max_new_tokens=16, stop_at_eos=False).token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(dl):
    populate(dl, TEAM)
    greedy = dl.agent("bob").generate(PROMPTS[1], max_new_tokens=10, stop_at_eos=False).token_ids
    top1 = (
        dl.agent("bob").generate(PROMPTS[1], temperature=0.7, top_k=1, max_new_tokens=10, stop_at_eos=False).token_ids
    )
    assert greedy == top1


def test_sampling_frequencies_follow_the_softmax(dl):
    """Sampled first tokens follow softmax(logits / T), checked with a chi-square bound."""
    from dynamiclora.config import GenerationConfig
    from dynamiclora.generation import sample_next

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    cfg = GenerationConfig(temperature=0.8)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.bincount(torch.cat([sample_next(logits, cfg, g) for _ in range(n)]), minlength=5).float()
    expected = (logits[0] / 0.8).softmax(-1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001


def test_top_p_keeps_only_the_nucleus():
    from dynamiclora.config import GenerationConfig
    from dynamiclora.generation import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = GenerationConfig(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, cfg, g)) for _ in range(500)}
    assert seen == {0, 1}


def test_a_vanishing_top_p_or_temperature_still_keeps_the_likeliest_token():
    from dynamiclora.config import GenerationConfig
    from dynamiclora.generation import probabilities

    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    for top_p, temperature in ((2.2e-313, 1.0), (1.0, 8e-156), (1e-45, 2.2e-308)):  # 0 in float32
        probs = probabilities(logits, GenerationConfig(temperature=temperature, top_p=top_p))
        assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0]])), probs


def test_prompt_too_long_names_the_numbers(dl):
    dl.agent("alice", swarm="s", domain="d")
    limit = dl.runtime.max_positions
    with pytest.raises(PromptTooLongError, match=rf"exceed the model's context of {limit} positions.*max_new_tokens"):
        dl.agent("alice").generate("word " * (limit + 10), max_new_tokens=4)
    with pytest.raises(PromptTooLongError):
        dl.agent("alice").generate("x", max_new_tokens=limit + 1)


def test_empty_prompt_is_rejected(dl):
    dl.agent("alice", swarm="s", domain="d")
    with pytest.raises(ValueError, match="prompt is empty"):
        dl.agent("alice").generate("")
