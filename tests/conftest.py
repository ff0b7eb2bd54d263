"""Shared fixtures: tiny random models built in process and helpers to fill every tier with circuits."""

from __future__ import annotations

import pytest
import torch

from dynamiclora import Circuit, DynamicLoRA, DynamicLoRAConfig
from dynamiclora.testing import tiny_model


def random_circuit(
    dl: DynamicLoRA, rank: int, generator: torch.Generator, scale: float = 1.0, magnitude: float = 0.05
) -> Circuit:
    """A circuit with random A and B on every adapted module (B non-zero, so it changes outputs)."""
    factors = {}
    for name, layer in dl.layers.items():
        a = torch.randn(rank, layer.in_features, generator=generator) * magnitude
        b = torch.randn(layer.out_features, rank, generator=generator) * magnitude
        factors[name] = (a, b)
    return Circuit(factors=factors, tier="context", scope="", scale=scale)


def populate(
    dl: DynamicLoRA, agents: dict[str, tuple[str, str]], per_scope: int = 2, rank: int = 4, seed: int = 0
) -> None:
    """Register agents {id: (swarm, domain)} and give every scope of their stacks random circuits."""
    g = torch.Generator().manual_seed(seed)
    for agent_id, (swarm, domain) in agents.items():
        dl.agent(agent_id, swarm=swarm, domain=domain)
    for key, scope in list(dl.hierarchy.scopes.items()):
        if not scope.circuits:
            for _ in range(per_scope):
                dl.add_circuit(key, random_circuit(dl, rank, g, scale=float(torch.rand((), generator=g)) + 0.5))


def make_dl(arch: str = "llama", config: DynamicLoRAConfig | None = None, seed: int = 0, **kwargs) -> DynamicLoRA:
    model, tokenizer = tiny_model(arch, seed=seed, **kwargs)
    return DynamicLoRA(model, tokenizer, config)


@pytest.fixture
def dl() -> DynamicLoRA:
    return make_dl("llama")


@pytest.fixture(params=["llama", "gpt2", "qwen2"])
def any_dl(request) -> DynamicLoRA:
    return make_dl(request.param)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(5, 500, (3, 12), generator=torch.Generator().manual_seed(1))
