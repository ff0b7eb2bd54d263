"""learn(): only context circuits change, attribution and spawning, completions are reproduced."""

from __future__ import annotations

import pytest
import torch

from dynamiclora import DynamicLoRA, DynamicLoRAConfig, LearningConfig
from dynamiclora.config import DynamicsConfig

from .conftest import make_dl, populate

TEAM = {"alice": ("backend", "python"), "bob": ("backend", "python")}
PROMPT, COMPLETION = "def parse_json(text):", "\n    return json.loads(text)"


def test_learned_completion_is_reproduced_by_greedy_generation(any_dl):
    alice = any_dl.agent("alice", swarm="backend", domain="python")
    assert alice.generate(PROMPT, max_new_tokens=16).text != COMPLETION
    for calls in range(1, 9):  # "a few": the built-in model needs 1-2, tiny random models up to ~6
        alice.learn(PROMPT, COMPLETION)
        result = alice.generate(PROMPT, max_new_tokens=16)
        if result.text == COMPLETION and result.finished:  # it learned to stop too (EOS follows the completion)
            break
    assert result.text == COMPLETION and result.finished, f"not reproduced after {calls} learn calls"


def test_only_the_learning_agents_context_tier_changes(dl):
    populate(dl, TEAM)
    hashes = {k: s.content_hash() for k, s in dl.hierarchy.scopes.items()}
    bob_before = dl.snapshot("bob").provenance_hash
    dl.agent("alice").learn(PROMPT, COMPLETION)
    changed = {str(k) for k, s in dl.hierarchy.scopes.items() if s.content_hash() != hashes[k]}
    assert changed == {"context:alice"}
    assert dl.snapshot("bob").provenance_hash == bob_before
    assert not any(p.requires_grad for p in dl.model.parameters())


def test_loss_decreases_and_repeat_interactions_reuse_their_circuit(dl):
    alice = dl.agent("alice", swarm="backend", domain="python")
    first = alice.learn(PROMPT, COMPLETION)
    assert first.spawned and first.loss_after < first.loss_before
    second = alice.learn(PROMPT, COMPLETION)
    assert not second.spawned and second.circuit_id == first.circuit_id
    assert second.activation >= dl.config.learning.attribution_threshold
    assert second.loss_after < first.loss_after


def test_unrelated_interaction_spawns_a_new_circuit(dl):
    alice = dl.agent("alice", swarm="backend", domain="python")
    a = alice.learn(PROMPT, COMPLETION)
    b = alice.learn("SELECT name FROM users WHERE", " id = 42;")
    assert b.spawned and b.circuit_id != a.circuit_id
    assert len(dl.hierarchy.scope("context:alice")) == 2


def test_new_circuit_does_not_change_outputs_at_spawn(dl):
    """B starts at zero: a freshly spawned circuit is invisible until trained."""
    from dynamiclora.keys import init_factors

    x = {"m": torch.randn(5, 16)}
    factors = init_factors(x, {"m": 8}, rank=4, from_activations=True, generator=torch.Generator().manual_seed(0))
    a, b = factors["m"]
    assert torch.count_nonzero(b) == 0
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal rows
    # rows span the input: projecting the inputs on them keeps their energy (5 tokens, rank 4 => most of it)
    assert float((x["m"] @ a.T).pow(2).sum() / x["m"].pow(2).sum()) > 0.8


def test_a_key_off_the_background_ignores_what_every_token_shares_and_keeps_its_reach():
    """Inputs = a direction every token shares (large) + one specific to a few tokens: the plain key is the shared
    direction; the key off the background is the specific one, as strong on its own inputs as the plain key."""
    from dynamiclora.keys import background_bases, init_factors

    g = torch.Generator().manual_seed(0)
    shared, specific = torch.linalg.qr(torch.randn(32, 2, generator=g))[0].T  # orthonormal (32,) directions
    ordinary = 5 * shared + 0.3 * torch.randn(40, 32, generator=g)  # background text: the shared direction
    pattern = 5 * shared + torch.outer(torch.tensor([0.0, 0.0, 3.0, 0.0]), specific)  # a subject at token 2
    pattern = pattern + 0.01 * torch.randn(4, 32, generator=g)
    bg = background_bases({"m": ordinary}, 1)
    keys = {}
    for protected in (None, bg):
        factors = init_factors({"m": pattern}, {"m": 8}, 1, True, torch.Generator(), protected, rescale=True)
        keys[protected is None] = factors["m"][0][0]
    plain, off = keys[True], keys[False]
    assert abs(float(plain @ shared)) > 0.95 * float(plain.norm())  # the plain key: what every token shares
    assert abs(float(off @ specific)) > 0.99 * float(off.norm())  # the key off the background: the specific one
    assert abs(float(off @ shared)) < 0.01 * float(off.norm())
    reach = (pattern @ off).abs()
    assert reach.argmax() == 2 and reach[[0, 1, 3]].max() < 0.05 * reach[2]  # it acts on the subject's token
    torch.testing.assert_close(reach.max(), pattern.norm(dim=1).max(), rtol=1e-5, atol=0)  # rescaled


def test_context_capacity_drops_the_weakest_circuit():
    # threshold 1.0: every interaction spawns (attribution quality is not what this test is about)
    dl = make_dl(
        config=DynamicLoRAConfig(
            learning=LearningConfig(context_capacity=2, steps_per_learn=1, attribution_threshold=1.0)
        )
    )
    alice = dl.agent("alice", swarm="s", domain="d")
    results = [alice.learn(p, c) for p, c in [("aaa", " 1"), ("import zz", " 2"), ("class Q:", " 3")]]
    assert len(dl.hierarchy.scope("context:alice")) == 2
    assert results[-1].dropped is not None


def test_a_full_context_tier_drops_the_most_faded_circuit_though_gated_ones_act_whole():
    """Gated circuits keep their strength while they fade (see dynamics.memory), so capacity pressure reads their
    vigor: the circuit idle longest goes first, though it was once used and the other never was."""
    dl = make_dl(
        config=DynamicLoRAConfig(
            dynamics=DynamicsConfig(tick_interval=0),
            learning=LearningConfig(context_capacity=2, steps_per_learn=1, attribution_threshold=1.0),
        )
    )
    alice = dl.agent("alice", swarm="s", domain="d")
    used_once = dl.hierarchy.find_circuit(alice.learn("aaa", " 1").circuit_id)[1]
    for _ in range(4):
        dl.memory.record_use(used_once)
        dl.tick()
    for _ in range(4):
        dl.tick()
    never_used = dl.hierarchy.find_circuit(alice.learn("import zz", " 2").circuit_id)[1]
    for _ in range(6):
        dl.tick()
    assert used_once.gate is not None and used_once.strength == never_used.strength == 1.0
    assert used_once.vigor < never_used.vigor and used_once.u > never_used.u
    assert alice.learn("class Q:", " 3").dropped == used_once.id


def test_critical_flag_is_recorded(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    r = alice.learn(PROMPT, COMPLETION, critical=True)
    assert dl.hierarchy.find_circuit(r.circuit_id)[1].critical


def test_score_rises_with_learning(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    before = alice.score(PROMPT, COMPLETION)
    alice.learn(PROMPT, COMPLETION)
    assert alice.score(PROMPT, COMPLETION) > before


def test_learn_rejects_empty_completion(dl):
    alice = dl.agent("alice", swarm="s", domain="d")
    with pytest.raises(ValueError, match="completion is empty"):
        alice.learn(PROMPT, "")


def test_attribution_key_is_stable_while_b_learns_and_a_stays_frozen(dl):
    """Keys are measured without the context tier, and A is not trained: a repeated interaction gets the same
    activation on every call, however much the circuit's B has learned meanwhile."""
    alice = dl.agent("alice", swarm="backend", domain="python")
    first = alice.learn(PROMPT, COMPLETION)
    a_before = {m: a.clone() for m, (a, _) in dl.hierarchy.find_circuit(first.circuit_id)[1].factors.items()}
    acts = [alice.learn(PROMPT, COMPLETION).activation for _ in range(3)]
    assert acts[0] == pytest.approx(acts[1], abs=1e-6) and acts[1] == pytest.approx(acts[2], abs=1e-6)
    assert acts[0] >= dl.config.learning.attribution_threshold
    circuit = dl.hierarchy.find_circuit(first.circuit_id)[1]
    assert all(torch.equal(circuit.factors[m][0], a) for m, a in a_before.items())
    assert any(torch.count_nonzero(b) for _, b in circuit.factors.values())


def test_key_activations_of_a_pattern_and_of_an_unrelated_one(dl):
    from dynamiclora.keys import key_activations

    alice = dl.agent("alice", swarm="backend", domain="python")
    alice.learn(PROMPT, COMPLETION)
    circuit = next(iter(dl.hierarchy.scope("context:alice").circuits.values()))

    def key(prompt, completion):
        ids = torch.tensor([dl.encode(prompt) + dl.encode(completion, special=False)])
        plan = dl.planner.plan(["alice"], without=("context",))
        session = dl.runtime.new_session(plan, observe=False, capture=True)
        with torch.no_grad(), dl.runtime.activate(plan, session):
            dl.model(input_ids=ids, use_cache=False)
        return key_activations([circuit], session.capture)[0]

    own, other = key(PROMPT, COMPLETION), key("SELECT name FROM users WHERE", " id = 42;")
    assert own > 0.85 > other


def test_labels_come_from_the_interactions_that_activate_a_circuit_most(dl):
    alice = dl.agent("alice", swarm="backend", domain="python")
    r = alice.learn(PROMPT, COMPLETION)
    alice.learn(PROMPT, COMPLETION)
    c = dl.hierarchy.find_circuit(r.circuit_id)[1]
    assert c.label == "def parse_json(text): → return json.loads(text)"
    assert len(c.examples) == 1 and c.examples[0][1] == PROMPT
    assert dl.circuits()[0]["examples"] == c.examples


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"


def test_chat_and_learning_from_a_conversation_use_what_the_model_reads(dl, monkeypatch):
    from dynamiclora.errors import InvalidInputError

    monkeypatch.setattr(dl.tokenizer, "chat_template", TEMPLATE, raising=False)  # the tiny tokenizer is shared
    alice = dl.agent("alice", swarm="s", domain="d")
    messages = [{"role": "user", "content": "parse this json"}]
    ids = dl.runtime.chat_ids(messages)
    assert dl.tokenizer.decode(ids) == "<user> parse this json\n<assistant>"  # the template, no token added
    assert (
        alice.chat(messages, max_new_tokens=4, use_cache=False).token_ids
        == alice.generate(ids, max_new_tokens=4, use_cache=False).token_ids
    )
    before = alice.logits(torch.tensor([ids]))
    r = alice.learn(messages=messages, completion=" json.loads(text)")
    assert r.spawned and not torch.allclose(alice.logits(torch.tensor([ids])), before)  # its gate opens on the chat
    with pytest.raises(InvalidInputError, match="exactly one of"):
        alice.learn("a prompt", " x", messages=messages)
    with pytest.raises(InvalidInputError, match="role"):
        alice.chat([{"content": "no role"}])


def test_the_chat_variant_teaches_the_pattern_for_the_same_request_asked_in_a_conversation():
    from dynamiclora.testing import tiny_chat_model

    fact, answer = "The capital of Zorbexia is", " Kamunvel"
    losses = {}
    for variants in ((), ("chat",)):
        model, tokenizer = tiny_chat_model("llama")
        dl = DynamicLoRA(model, tokenizer, DynamicLoRAConfig(learning={"learn_variants": variants}))
        alice = dl.agent("alice", swarm="s", domain="d")
        alice.learn(fact, answer)
        chat = dl.runtime.chat_ids([{"role": "user", "content": fact}])  # reaches the gate: pooled over the content
        ids = torch.tensor([chat + dl.encode(answer.strip(), special=False)])
        labels = ids.clone()
        labels[:, : len(chat)] = -100
        logits = alice.logits(ids, route_tokens=len(chat))
        losses[variants] = float(torch.nn.functional.cross_entropy(logits[0, len(chat) - 1 : -1], ids[0, len(chat) :]))
    assert losses[("chat",)] < 0.8 * losses[()]  # (one learn call: 3.3 against 5.2)
    with pytest.raises(Exception, match="learn_variants"):
        DynamicLoRAConfig(learning={"learn_variants": ("paraphrase",)})
