"""Every boundary error names the problem and the fix."""

from __future__ import annotations

import warnings

import pytest

from dynamiclora import (
    AdapterConfig,
    ConfigError,
    DynamicLoRA,
    DynamicLoRAConfig,
    GenerationConfig,
    LearningConfig,
    UnknownAgentError,
    UnknownScopeError,
)
from dynamiclora.testing import tiny_model

from .conftest import make_dl


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AdapterConfig(circuit_rank=0), r"AdapterConfig.circuit_rank must be >= 1, got 0"),
        (lambda: AdapterConfig(merged_tiers=("context",)), r"merged_tiers must not contain 'context'"),
        (lambda: AdapterConfig(merged_tiers=("galaxy",)), r"unknown tier 'galaxy'"),
        (lambda: AdapterConfig(merged_usage_sample_rate=2.0), r"merged_usage_sample_rate must lie in \[0, 1\]"),
        (lambda: AdapterConfig(target_modules=()), r"target_modules is empty"),
        (lambda: LearningConfig(learning_rate=-1), r"LearningConfig.learning_rate must be > 0"),
        (lambda: LearningConfig(attribution_threshold=1.5), r"attribution_threshold must lie in \[0, 1\]"),
        (lambda: LearningConfig(context_capacity=0), r"context_capacity must be >= 1"),
        (lambda: GenerationConfig(top_p=0), r"GenerationConfig.top_p must lie in \(0, 1\]"),
        (lambda: GenerationConfig(max_new_tokens=0), r"max_new_tokens must be >= 1"),
        (lambda: DynamicLoRAConfig(adapter="big"), r"DynamicLoRAConfig.adapter must be a AdapterConfig or a dict"),
        (lambda: DynamicLoRAConfig.from_dict({"adapter": {"circuit_rank": "eight", "x": 1}}), r"circuit_rank"),
    ],
)
def test_invalid_configuration(build, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=message):
            build()


def test_config_round_trip_and_unknown_keys_warn():
    cfg = DynamicLoRAConfig(adapter=AdapterConfig(circuit_rank=4, target_modules=("q_proj",)))
    assert DynamicLoRAConfig.from_dict(cfg.to_dict()) == cfg
    data = cfg.to_dict()
    data["learning"]["from_the_future"] = 1
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        assert DynamicLoRAConfig.from_dict(data) == cfg


def test_target_modules_that_match_nothing():
    model, tok = tiny_model("llama")
    with pytest.raises(ConfigError, match="matches no Linear/Conv1D module"):
        DynamicLoRA(model, tok, DynamicLoRAConfig(adapter=AdapterConfig(target_modules=("nope",))))


def test_target_modules_patterns_select_modules():
    model, tok = tiny_model("llama")
    dl = DynamicLoRA(
        model,
        tok,
        DynamicLoRAConfig(
            adapter=AdapterConfig(target_modules=(r"q_proj$", r"v_proj$"), exclude_modules=(r"layers\.1\.",))
        ),
    )
    assert sorted(dl.layers) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_default_targets_are_all_linear_but_the_head(any_dl):
    assert all("lm_head" not in n for n in any_dl.layers)
    assert len(any_dl.layers) in (14, 8)  # llama/qwen2: 7 per block; gpt2: 4 per block


def test_unknown_agent(dl):
    dl.agent("alice", swarm="s", domain="d")
    with pytest.raises(UnknownAgentError, match=r"unknown agent 'bob' \(registered: alice\).*dl.agent\('bob'"):
        dl.agent("bob")
    with pytest.raises(UnknownAgentError):
        dl.generate_batch([("bob", "x")])


def test_agent_cannot_change_team(dl):
    dl.agent("alice", swarm="s", domain="d")
    with pytest.raises(ValueError, match="already registered with swarm='s'"):
        dl.agent("alice", swarm="t", domain="d")
    assert dl.agent("alice", swarm="s", domain="d").id == "alice"


@pytest.mark.parametrize("bad", ["", "a:b"])
def test_bad_agent_ids(dl, bad):
    with pytest.raises(ValueError, match="non-empty string without ':'"):
        dl.agent(bad, swarm="s", domain="d")


def test_unknown_scope(dl):
    dl.agent("alice", swarm="s", domain="d")
    with pytest.raises(UnknownScopeError, match="unknown tier 'galaxy'"):
        dl.circuits(scope="galaxy:x")
    with pytest.raises(UnknownScopeError, match="needs a name"):
        dl.circuits(scope="swarm")
    with pytest.raises(UnknownScopeError, match=r"unknown scope 'swarm:zzz'"):
        dl.circuits(scope="swarm:zzz")
    with pytest.raises(ConfigError, match="unknown tier"):
        dl.circuits(tier="galaxy")


def test_batch_rows_and_agents_must_agree(dl, ids):
    dl.agent("alice", swarm="s", domain="d")
    with pytest.raises(ValueError, match="give one per row"):
        dl.forward(["alice"], ids)


def test_make_dl_helper_builds_distinct_seeds():
    assert make_dl(seed=0).base_fingerprint != make_dl(seed=1).base_fingerprint
