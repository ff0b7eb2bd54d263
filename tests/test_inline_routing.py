"""Routing inside a request's own forward (see inline_routing.py): where no circuit acts before the route module, a
request routes on its own forward's states instead of a base-model pre-pass, with the pre-pass's routes and
outputs; a route that rounding could flip, and a stack with a circuit before the route module, take the
pre-pass."""

from __future__ import annotations

import pytest
import torch

from dynamiclora import DynamicLoRA, DynamicLoRAConfig, GenerationConfig
from dynamiclora.errors import ConfigError
from dynamiclora.gates import Gate
from dynamiclora.inline_routing import SLACK

from .conftest import make_dl, random_circuit
from .test_token_gates import FACT, NOT_REACHED, REACHED

GREEDY = GenerationConfig(max_new_tokens=4, stop_at_eos=False)


def late_dl(after_route: bool = True) -> DynamicLoRA:
    learning = {"route_match": "tokens", "circuits_after_route": after_route}
    dl = make_dl(config=DynamicLoRAConfig(learning=learning, dynamics={"tick_interval": 0}))
    for agent in ("alice", "bob"):
        dl.agent(agent, swarm="team", domain="python")
    dl.agent("alice").learn(*FACT)
    return dl


class PrePasses:
    """Counts the router's base-model pre-passes (feature computations of prompts it has not seen)."""

    def __init__(self, dl: DynamicLoRA, monkeypatch) -> None:
        self.count, router, features = 0, dl.router, dl.router.features

        def counted(prompts):
            self.count += sum(tuple(p) not in router._memo for p in prompts)
            return features(prompts)

        monkeypatch.setattr(router, "features", counted)
        router.forget_features()


def outputs(dl: DynamicLoRA, texts) -> list:
    """Each text's logits for alice alone, both agents' batch, and alice's greedy tokens."""
    out = []
    for text in texts:
        ids = torch.tensor([dl.encode(text)])
        out.append(dl.forward(["alice"], ids)[0])
        out.append(dl.forward(["alice", "bob"], ids.repeat(2, 1))[0])
        out.append(dl.generate_ids(["alice", "bob"], [ids[0].tolist(), dl.encode("x = 1")], GREEDY)[0].tokens)
    return out


def pre_pass_outputs(dl: DynamicLoRA, texts, monkeypatch) -> list:
    with monkeypatch.context() as m:
        m.setattr(dl.runtime.inline, "applies", lambda *args: False)
        return outputs(dl, texts)


def assert_same(inline: list, pre_pass: list) -> None:
    for a, b in zip(inline, pre_pass):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a == b


def test_a_request_routes_inside_its_forward_with_the_pre_passs_routes_and_outputs(monkeypatch):
    dl = late_dl()
    route_index = list(dl.layers).index(dl.router.module)
    (circuit,) = dl.hierarchy.scope(("context", "alice")).circuits.values()
    assert set(circuit.factors) <= set(list(dl.layers)[route_index:])  # circuits_after_route
    texts = (FACT[0], *REACHED, *NOT_REACHED)
    expected = pre_pass_outputs(dl, texts, monkeypatch)
    passes = PrePasses(dl, monkeypatch)
    got = outputs(dl, texts)
    assert passes.count == 0  # every route came from the requests' own forwards
    assert_same(got, expected)
    base = dl.forward(["bob"], torch.tensor([dl.encode(FACT[0])]))[0]
    assert not torch.allclose(got[0], base, atol=1e-4)  # the circuit acts on the taught prompt: routed, not skipped


def test_a_route_that_rounding_could_flip_is_decided_by_the_pre_pass(monkeypatch):
    dl = late_dl()
    (circuit,) = dl.hierarchy.scope(("context", "alice")).circuits.values()
    gate = circuit.gate
    text = NOT_REACHED[0]  # the template about another entity: a partial match (about 0.5), not reached
    match = 1.0 - Gate.prototype(gate.keys, 0.0).distance(dl.router.features([dl.encode(text)])[0])
    assert match < 0.9  # (the keys' mean best cosine: a threshold just above it is a threshold below 1)
    for offset in (SLACK / 3, -SLACK / 3):  # just above the prompt's match (not reached), just below (reached)
        circuit.gate = Gate(gate.keys, torch.full_like(gate.radii, match + offset), gate.owners, gate.groups)
        dl.hierarchy.scope(("context", "alice")).touch()
        expected = pre_pass_outputs(dl, [text], monkeypatch)
        passes = PrePasses(dl, monkeypatch)
        got = outputs(dl, [text])
        assert passes.count == 1  # in doubt: the prompt took the pre-pass (then remembered)
        assert_same(got, expected)
        reached = not torch.allclose(got[0], dl.forward(["bob"], torch.tensor([dl.encode(text)]))[0])
        assert reached == (offset < 0)


def test_a_circuit_before_the_route_module_routes_with_the_pre_pass(monkeypatch):
    dl = late_dl(after_route=False)
    (circuit,) = dl.hierarchy.scope(("context", "alice")).circuits.values()
    route_index = list(dl.layers).index(dl.router.module)
    assert set(circuit.factors) & set(list(dl.layers)[:route_index])  # it acts before the route module
    passes = PrePasses(dl, monkeypatch)
    got = outputs(dl, [FACT[0]])
    assert passes.count == 1
    assert_same(got, pre_pass_outputs(dl, [FACT[0]], monkeypatch))


def test_a_circuit_added_before_the_route_module_later_sends_the_next_request_to_the_pre_pass(monkeypatch):
    dl = late_dl()
    passes = PrePasses(dl, monkeypatch)
    outputs(dl, [FACT[0]])
    assert passes.count == 0  # routed inline
    dl.hierarchy.scope(("swarm", "team")).add(random_circuit(dl, 2, torch.Generator().manual_seed(0)))
    dl.router.forget_features()
    got = outputs(dl, [FACT[0]])
    assert passes.count == 1  # an ungated circuit on every module now changes what the route module sees
    assert_same(got, pre_pass_outputs(dl, [FACT[0]], monkeypatch))


def test_circuits_after_route_needs_a_circuit_module_there():
    early = r"layers\.0\.self_attn\.q_proj"
    with pytest.raises(ConfigError, match="at or after the route module"):
        learning = {"route_match": "tokens", "circuits_after_route": True, "circuit_modules": (early,)}
        make_dl(config=DynamicLoRAConfig(learning=learning))


def test_the_servers_prefill_routes_inside_its_forward_and_decodes_what_the_pre_pass_would(monkeypatch):
    """Rows admitted to the running decode (two a step after the first) route on their own prefill's states, and
    every row decodes the tokens the pre-pass's routes give, which are the agent's own generate's."""
    from dynamiclora.server.scheduler import GenerateJob, Scheduler

    dl = late_dl()
    dl.config.generation.stop_at_eos = False
    rows = [("alice", FACT[0]), ("alice", NOT_REACHED[0]), ("bob", REACHED[0])]

    def served() -> dict[tuple[str, str], list[int]]:
        done: dict[tuple[str, str], list[int]] = {}
        finished = lambda j, c: done.setdefault((j.agent_id, j.prompt), c.token_ids)  # noqa: E731
        sched = Scheduler(dl.runtime, dl.wavegen, False, finished)
        jobs = [GenerateJob(a, t, dl.encode(t), 6) for a, t in rows]
        sched.admit(jobs[:1])
        sched.step()
        sched.admit(jobs[1:])
        while sched.rows:
            sched.step()
        return done

    with monkeypatch.context() as m:
        m.setattr(dl.runtime.inline, "applies", lambda *args: False)
        expected = served()
    passes = PrePasses(dl, monkeypatch)
    got = served()
    assert passes.count == 0  # routed inside the prefills
    assert got == expected and len(got) == 3
    six = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    for agent, text in rows:
        assert got[agent, text] == dl.generate_ids([agent], [dl.encode(text)], six)[0].tokens[0]
    assert got["alice", FACT[0]] != dl.generate_ids(["bob"], [dl.encode(FACT[0])], six)[0].tokens[0]  # it acts
