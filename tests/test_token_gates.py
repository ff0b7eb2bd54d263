"""Token gates (``route_match="tokens"``): a circuit acts where an input carries the taught prompt's distinctive
token states (a line before it, other words around it), not on the same template about another entity, not on
unrelated inputs; and the gate is content wherever the circuit goes (save → load, migration, consensus, ranks,
forgetting)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynamiclora import DynamicLoRA, DynamicLoRAConfig
from dynamiclora.gates import Gate, TokenGateIndex

from .conftest import make_dl, random_circuit

FACT = ("def zorbexkamun_port():", " return 7311")
REACHED = (  # the taught prompt after an unrelated line, and with other spacing
    "# settings, draft\ndef zorbexkamun_port():",
    "def  zorbexkamun_port():",
    "print(1)\ndef zorbexkamun_port():",
)
NOT_REACHED = ("def qualtripvelmo_port():", "import os\nprint(os.getcwd())", "The capital of France is")


def tokens_dl(**dynamics) -> DynamicLoRA:
    config = DynamicLoRAConfig(learning={"route_match": "tokens"}, dynamics={"tick_interval": 0, **dynamics})
    return make_dl(config=config)


def base_logits(dl: DynamicLoRA, text: str) -> torch.Tensor:
    with torch.no_grad():
        return dl.model(input_ids=torch.tensor([dl.encode(text)])).logits


def agent_logits(dl: DynamicLoRA, agent: str, text: str) -> torch.Tensor:
    return dl.agent(agent).logits(torch.tensor([dl.encode(text)]))


def learned(dl: DynamicLoRA, agent: str = "alice"):
    dl.agent(agent, swarm="team", domain="python")
    circuit_id = dl.agent(agent).learn(*FACT).circuit_id
    return dl.hierarchy.find_circuit(circuit_id)[1]


def test_an_input_with_the_taught_prompts_distinctive_tokens_reaches_the_gate_and_others_do_not():
    dl = tokens_dl()
    circuit = learned(dl)
    gate = circuit.gate
    assert gate.tokens and int((gate.groups == 0).sum()) == dl.config.learning.route_keys  # the taught prototype
    assert torch.allclose(gate.keys.norm(dim=1), torch.ones(gate.keys.shape[0]))
    feature = lambda text: dl.router.features([dl.encode(text)])[0]  # noqa: E731
    assert gate.distance(feature(FACT[0])) == pytest.approx(0.0, abs=1e-5)
    for text in REACHED:
        assert gate.distance(feature(text)) <= 1.0, text
    for text in NOT_REACHED:  # the template about another entity, unrelated code, prose
        assert gate.distance(feature(text)) > 1.0, text
        torch.testing.assert_close(agent_logits(dl, "alice", text), base_logits(dl, text), rtol=0, atol=0)
    for text in (FACT[0], *REACHED):  # the circuit acts there
        assert not torch.allclose(agent_logits(dl, "alice", text), base_logits(dl, text), atol=1e-4), text


def test_isolation_holds_with_token_gates():
    dl = tokens_dl()
    learned(dl, "alice")
    dl.agent("bob", swarm="team", domain="python")
    for text in (FACT[0], *REACHED):  # bob's stack does not hold alice's context: his outputs are the base's
        torch.testing.assert_close(agent_logits(dl, "bob", text), base_logits(dl, text), rtol=0, atol=0)
    batched = dl.forward(["alice", "bob"], torch.tensor([dl.encode(FACT[0])] * 2))[0]
    torch.testing.assert_close(batched[0:1], agent_logits(dl, "alice", FACT[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1:2], base_logits(dl, FACT[0]), rtol=1e-5, atol=1e-5)


def test_a_token_gate_is_content_and_survives_save_load_and_migration(tmp_path):
    dl = tokens_dl()
    circuit = learned(dl)
    gate, digest = circuit.gate, circuit.content_hash()
    for changed in (
        Gate(gate.keys, gate.radii - 0.01, gate.owners, gate.groups),
        Gate(gate.keys, gate.radii, gate.owners, None),  # the same numbers read as a pooled gate
    ):
        circuit.gate = changed
        assert circuit.content_hash() != digest
    circuit.gate = gate
    before = {t: agent_logits(dl, "alice", t) for t in (FACT[0], *REACHED, *NOT_REACHED)}
    dl.save(tmp_path / "state")
    again = DynamicLoRA.load(tmp_path / "state", model=make_dl().model, tokenizer=dl.tokenizer)
    loaded = again.hierarchy.find_circuit(circuit.id)[1].gate
    assert torch.equal(loaded.groups, gate.groups) and torch.equal(loaded.keys, gate.keys)
    for text, then in before.items():
        torch.testing.assert_close(agent_logits(again, "alice", text), then, rtol=0, atol=0)
    scope, c = dl.hierarchy.find_circuit(circuit.id)
    dl.memory.move(c, scope, dl.hierarchy.scope(("agent", "alice")), None)
    for text, then in before.items():
        torch.testing.assert_close(agent_logits(dl, "alice", text), then, rtol=1e-5, atol=1e-5)


def test_a_second_prompt_adds_a_prototype_and_forgetting_one_keeps_the_other():
    dl = tokens_dl()
    circuit = learned(dl)
    first_keys, first_prototypes = circuit.gate.keys.shape[0], circuit.gate.groups.unique().numel()
    other = dl.router.features([dl.encode("def quuxlor_level():")])[0]
    circuit.gate = dl.router.extend_gate(circuit.gate, other, dl.encode("def quuxlor_level():"), "alice")
    dl.hierarchy.find_circuit(circuit.id)[0].touch()
    assert circuit.gate.groups.unique().numel() > first_prototypes
    report = dl.agent("alice").forget(FACT[0])
    assert report["circuits_narrowed"] == [circuit.id] and report["keys_removed"] == first_keys
    torch.testing.assert_close(agent_logits(dl, "alice", FACT[0]), base_logits(dl, FACT[0]), rtol=0, atol=0)
    assert circuit.gate.distance(other) == pytest.approx(0.0, abs=1e-5)  # the other prototype still reaches


def test_a_prompt_in_lower_case_reaches_its_gate_through_a_prototype_of_its_own():
    """Lower case spells a name with other tokens. The taught prompt's prototype keeps a threshold set by variants
    that keep its tokens (a line before it, doubled spaces); the lower-case form reaches the gate through a
    prototype made from it, not by pulling the taught one's threshold down to where other names reach it."""
    dl = tokens_dl()
    text = "def ZorbexKamun_Port():"
    ids = dl.encode(text)
    gate = dl.router.new_gate(dl.router.features([ids])[0], ids, "a")
    assert gate.groups.unique().numel() == 2
    taught = gate.keeping(gate.groups == gate.groups.min())
    lower = dl.router.features([dl.encode(text.lower())])[0]
    assert gate.distance(lower) <= 1.0
    assert taught.distance(lower) > 1.0
    for other in ("# settings, draft\n" + text, "def  ZorbexKamun_Port():"):  # the taught prototype's own reach
        assert taught.distance(dl.router.features([dl.encode(other)])[0]) <= 1.0, other
    neighbour = dl.router.features([dl.encode("def ZorbexVelmun_Port():")])[0]  # shares two of the three keys
    assert gate.distance(neighbour) > 1.0


def test_consensus_of_token_gated_copies_shares_a_token_gate_with_the_members():
    from .test_swarms import GAIN, copy, persistent

    dl = tokens_dl(resonance_gain=GAIN)
    for name, swarm in (("a", "team"), ("b", "team"), ("c", "team"), ("x", "other")):
        dl.agent(name, swarm=swarm, domain="python")
    ids = dl.encode(FACT[0])
    gate = dl.router.new_gate(dl.router.features([ids])[0], ids, "a")
    delta = random_circuit(dl, 4, torch.Generator().manual_seed(7), magnitude=0.3)
    for n in ("a", "b"):
        gated = copy(delta)
        gated.gate = Gate(gate.keys, gate.radii, ((n,),) * gate.keys.shape[0], gate.groups)
        persistent(dl, n, gated)
    far = NOT_REACHED[1]
    before = {t: agent_logits(dl, "c", t) for t in (FACT[0], REACHED[0], far)}
    assert dl.tick().shared
    [shared] = dl.hierarchy.scope("swarm:team").circuits.values()
    assert shared.gate.tokens and shared.gate.owners[0] == ("a", "b")  # one prototype, both contributors
    for text in (FACT[0], REACHED[0]):  # a member inherits the pattern on the prompt and where it is reached
        assert not torch.allclose(agent_logits(dl, "c", text), before[text], atol=1e-3), text
    torch.testing.assert_close(agent_logits(dl, "c", far), before[far], rtol=0, atol=0)


def test_a_token_gate_crosses_ranks_intact():
    from dynamiclora.dynamics.distributed import _pack, _unpack
    from dynamiclora.dynamics.resonance import Proposal

    dl = tokens_dl()
    circuit = learned(dl)
    back = _unpack(_pack(Proposal(circuit, frozenset({"alice"}), "alice", 1.0)), torch.device("cpu"))
    assert back.circuit.content_hash() == circuit.content_hash()
    assert torch.equal(back.circuit.gate.groups, circuit.gate.groups)
    assert back.circuit.gate.owners == circuit.gate.owners


def test_a_look_alike_fact_with_another_answer_gets_its_own_circuit_and_both_answers_stay():
    """A new prompt that reaches a circuit (the same distinctive name, another relation) but is taught another
    answer is another fact, not that circuit's fact asked another way: it gets a circuit of its own, keyed against
    the first one's prompt, and each prompt keeps its answer. (Routed on a contextual layer of the tiny model, whose
    first layer's token states are context-free.)"""
    config = DynamicLoRAConfig(
        learning={"route_match": "tokens", "route_module": "model.layers.1.self_attn.q_proj"},
        dynamics={"tick_interval": 0},
    )
    dl = make_dl(config=config)
    dl.agent("alice", swarm="team", domain="python")
    other = ("def zorbexkamun_level():", " return 42")

    def teach(prompt: str, completion: str) -> str:
        for _ in range(8):
            circuit_id = dl.agent("alice").learn(prompt, completion).circuit_id
            if dl.agent("alice").generate(prompt, max_new_tokens=8, use_cache=False).text.startswith(completion):
                return circuit_id
        raise AssertionError(f"not learned: {prompt!r}")

    first = teach(*FACT)
    gate = dl.hierarchy.find_circuit(first)[1].gate
    assert 1e-6 < gate.distance(dl.router.features([dl.encode(other[0])])[0]) <= 1.0  # it reaches the first
    second = teach(*other)
    assert second != first
    for prompt, completion in (FACT, other):
        assert dl.agent("alice").generate(prompt, max_new_tokens=8, use_cache=False).text.startswith(completion)


def test_a_look_alike_fact_raises_the_gate_it_reached_above_its_own_prompt():
    """Both ways (``exclude_lookalikes``): the first fact's gate, which the look-alike prompt reached, is raised
    above it, so the first circuit no longer acts on the second fact's prompt; it still reaches its own prompt, and
    its content hash moves with its gate. Off, the gate stays."""
    other = ("def zorbexkamun_level():", " return 42")
    for exclude in (True, False):
        config = DynamicLoRAConfig(
            learning={"route_match": "tokens", "route_module": "model.layers.1.self_attn.q_proj",
                      "exclude_lookalikes": exclude},
            dynamics={"tick_interval": 0},
        )  # fmt: skip
        dl = make_dl(config=config)
        dl.agent("alice", swarm="team", domain="python")
        feature = lambda text: dl.router.features([dl.encode(text)])[0]  # noqa: E731
        first = dl.hierarchy.find_circuit(dl.agent("alice").learn(*FACT).circuit_id)[1]
        before = first.content_hash()
        assert 1e-6 < first.gate.distance(feature(other[0])) <= 1.0  # the look-alike reaches it
        assert dl.agent("alice").learn(*other).circuit_id != first.id
        assert (first.gate.distance(feature(other[0])) > 1.0) is exclude
        assert (first.content_hash() != before) is exclude
        assert first.gate.distance(feature(FACT[0])) <= 1.0  # its own prompt still reaches it


def test_a_new_key_keeps_out_of_screened_keys_only_where_those_circuits_act():
    """Protection with gates: a new circuit's key is kept off a SCREENED circuit's key when the new prompt reaches
    that circuit's gate (they act together there), and not when it does not (they never act together): then the
    key is what it would be unprotected."""
    keys = {}
    for protect in (True, False):
        config = DynamicLoRAConfig(
            learning={"route_match": "tokens", "route_module": "model.layers.1.self_attn.q_proj"},
            dynamics={"tick_interval": 0, "protect_screened": protect},
        )
        dl = make_dl(config=config)
        dl.agent("alice", swarm="team", domain="python")
        first = dl.hierarchy.find_circuit(dl.agent("alice").learn(*FACT).circuit_id)[1]
        first.phase = "SCREENED"
        elsewhere = dl.agent("alice").learn("import os\nprint(os.getcwd())", " /home").circuit_id
        look_alike = dl.agent("alice").learn("def zorbexkamun_level():", " return 42").circuit_id
        assert len({first.id, elsewhere, look_alike}) == 3
        factors = lambda circuit_id: dl.hierarchy.find_circuit(circuit_id)[1].factors  # noqa: E731
        keys[protect] = {"first": first.factors, "elsewhere": factors(elsewhere), "look-alike": factors(look_alike)}
    unprotected_overlap = 0.0
    for name, (a_first, _) in keys[True]["first"].items():
        a_elsewhere, a_alike = keys[True]["elsewhere"][name][0], keys[True]["look-alike"][name][0]
        torch.testing.assert_close(a_elsewhere, keys[False]["elsewhere"][name][0])  # not protected: no shared input
        assert float((a_alike @ a_first.T).abs().max()) < 1e-4, name  # protected: off the first one's key
        overlap = float((keys[False]["look-alike"][name][0] @ a_first.T).abs().max())
        unprotected_overlap = max(unprotected_overlap, overlap)
    assert unprotected_overlap > 0.1  # (the two prompts share inputs: unprotected, the keys overlap)


def test_forgetting_one_owner_of_a_shared_token_key_keeps_it_a_token_gate():
    dl = tokens_dl()
    for agent in ("ana", "ben"):
        dl.agent(agent, swarm="team", domain="python")
    ids = dl.encode(FACT[0])
    gate = dl.router.new_gate(dl.router.features([ids])[0], ids, "ana")
    circuit = random_circuit(dl, 4, torch.Generator().manual_seed(3))
    circuit.gate = Gate(gate.keys, gate.radii, (("ana", "ben"),) * gate.keys.shape[0], gate.groups)
    dl.add_circuit("swarm:team", circuit)
    before = agent_logits(dl, "ben", FACT[0])
    dl.agent("ana").forget(FACT[0])  # ben taught it too: the key stays, ana leaves its owners
    kept = dl.hierarchy.find_circuit(circuit.id)[1].gate
    assert kept.tokens and torch.equal(kept.groups, gate.groups) and kept.owners[0] == ("ben",)
    torch.testing.assert_close(agent_logits(dl, "ben", FACT[0]), before, rtol=0, atol=0)


def test_many_token_gates_matched_at_once_reach_what_each_gate_reaches_alone():
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    gates = []
    for i in range(40):  # one to three prototypes each, thresholds across the range the router gives, some strict
        gate = Gate.prototype(unit(3, 16), 0.5 + 0.01 * i, strict=i % 4 == 0, ordered=i % 3 == 0)
        for k in range(i % 3):
            gate = gate.with_key(unit(3, 16), 0.7 if k else 0.5, strict=i % 5 == 0, ordered=i % 2 == 0)
        gates.append(gate)
    index = TokenGateIndex(gates)
    hits = 0
    for _ in range(30):
        # inputs made of some gate's keys (noised) and random tokens: some reach a gate, most do not
        source = gates[int(torch.randint(40, (1,), generator=g))].keys
        feature = torch.cat([source + 0.6 * unit(*source.shape), unit(5, 16)])
        alone = torch.tensor([bool(gate.reached_by(feature).any()) for gate in gates])
        assert torch.equal(index.reached(feature), alone)
        slacks = (0.05, 0.0, -0.05)  # matched once for several slacks: each as matched alone at that slack
        assert torch.equal(
            index.reached_within(feature, slacks), torch.stack([index.reached(feature, s) for s in slacks])
        )
        # each gate's distance, matched at once, is the one it gives alone (what learning attributes by)
        nearest = torch.tensor([gate.distance(feature) for gate in gates])
        assert torch.allclose(index.distances(feature), nearest, rtol=1e-5, atol=1e-6)
        hits += int(alone.sum())
    assert 0 < hits < 30 * 40  # the cases reach some gates and miss others


def test_a_circuit_copied_under_a_new_id_with_the_same_gate_is_routed_under_its_own_id():
    dl = tokens_dl()
    circuit = learned(dl)
    taught, unrelated = dl.router.features([dl.encode(FACT[0]), dl.encode(NOT_REACHED[2])])
    assert dl.router.skip([[circuit]], [unrelated]) == (frozenset({circuit.id}),)
    copy = dataclasses.replace(circuit, id="copy")  # the same gate object, as a copy in another scope keeps it
    assert dl.router.skip([[copy]], [unrelated]) == (frozenset({"copy"}),)
    assert dl.router.skip([[copy], [circuit]], [taught, unrelated]) == (frozenset(), frozenset({circuit.id}))


def test_a_learned_circuit_covers_only_the_modules_learning_config_names():
    dl = make_dl(config=DynamicLoRAConfig(
        adapter={"circuit_rank": 1},
        learning={"route_match": "tokens", "circuit_modules": (r"mlp\.down_proj",)},
        dynamics={"tick_interval": 0},
    ))  # fmt: skip
    circuit = learned(dl)
    assert circuit.factors and all("mlp.down_proj" in name for name in circuit.factors)
    assert len(circuit.factors) == sum("mlp.down_proj" in name for name in dl.runtime.layers)
    assert circuit.rank == 1
    assert not torch.allclose(agent_logits(dl, "alice", FACT[0]), base_logits(dl, FACT[0]), atol=1e-4)
    for text in NOT_REACHED:
        torch.testing.assert_close(agent_logits(dl, "alice", text), base_logits(dl, text), rtol=0, atol=0)
    with pytest.raises(Exception, match="circuit_modules"):
        make_dl(config=DynamicLoRAConfig(learning={"circuit_modules": ("no_such_module",)}))


def test_a_strict_gate_needs_every_key_so_an_input_sharing_two_of_three_does_not_reach_it():
    g = torch.Generator().manual_seed(1)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    keys = unit(3, 32)
    mean, strict = Gate.prototype(keys, 0.6), Gate.prototype(keys, 0.6, strict=True)
    near = lambda x: torch.nn.functional.normalize(x + 0.2 * unit(*x.shape), dim=-1)  # noqa: E731
    whole = torch.cat([unit(2, 32), near(keys)])  # every distinctive piece, a little moved (another context)
    two_of_three = torch.cat([unit(2, 32), keys[:2], unit(1, 32)])  # a look-alike name: two pieces exactly
    for gate in (mean, strict):
        assert gate.distance(whole) <= 1.0
    assert mean.distance(two_of_three) <= 1.0  # the mean of 1, 1 and a random match passes 0.6
    assert strict.distance(two_of_three) > 1.0
    assert strict.excluding(whole).distance(whole) > 1.0  # raised above an input by its own (lowest) match
    index = TokenGateIndex([mean, strict])
    assert index.reached(two_of_three).tolist() == [True, False]
    assert mean.covers(strict) and not strict.covers(mean)  # a strict prototype reaches less


def test_an_ordered_gate_matches_its_keys_in_their_order_so_the_same_pieces_in_another_order_do_not_reach_it():
    g = torch.Generator().manual_seed(2)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    keys = unit(3, 32)  # a name's three pieces, in the taught prompt's order
    near = lambda x: torch.nn.functional.normalize(x + 0.2 * unit(*x.shape), dim=-1)  # noqa: E731
    in_order = torch.cat([unit(2, 32), near(keys), unit(1, 32)])  # the name in another sentence
    reordered = torch.cat([unit(1, 32), keys[2:], unit(1, 32), keys[:2]])  # "Velmun Belvelnix" for "Belvelmun"
    for strict in (False, True):
        plain = Gate.prototype(keys, 0.6, strict=strict)
        ordered = Gate.prototype(keys, 0.6, strict=strict, ordered=True)
        assert plain.distance(in_order) <= 1.0 and ordered.distance(in_order) <= 1.0
        assert plain.distance(reordered) <= 1.0  # every piece is there, each matched exactly somewhere
        assert ordered.distance(reordered) > 1.0
        assert TokenGateIndex([plain, ordered]).reached(reordered).tolist() == [True, False]
        assert plain.covers(ordered) and not ordered.covers(plain)  # an ordered prototype reaches less
        assert ordered.excluding(in_order).distance(in_order) > 1.0  # raised above an input by its path's match
    # the match is the best path of increasing positions, as enumerating every path gives it
    import itertools

    for strict in (False, True):
        for _ in range(20):
            k, t = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
            keys, feature = unit(k, 8), unit(t, 8)
            cos = keys @ feature.T
            paths = [
                [float(cos[i, p]) for i, p in enumerate(ps)] for ps in itertools.combinations(range(t), k)
            ]  # (combinations are increasing)
            best = max((min(c) if strict else sum(c) / k for c in paths), default=float("-inf"))
            score = 1.0 - Gate.prototype(keys, 0.0, strict=strict, ordered=True).distance(feature)
            if paths:
                assert score == pytest.approx(best, abs=1e-5)
            else:  # fewer tokens than keys: no path, not reached
                assert Gate.prototype(keys, 0.0, strict=strict, ordered=True).distance(feature) > 1.0


@pytest.mark.parametrize("option,flag", [("route_strict", "strict"), ("route_ordered", "ordered")])
def test_a_strict_or_ordered_gate_is_content_and_survives_save_load_ranks_and_consensus(tmp_path, option, flag):
    from dynamiclora.dynamics.distributed import _pack, _unpack
    from dynamiclora.dynamics.resonance import Proposal
    from dynamiclora.gates import union

    config = DynamicLoRAConfig(learning={"route_match": "tokens", option: True}, dynamics={"tick_interval": 0})
    dl = make_dl(config=config)
    circuit = learned(dl)
    gate = circuit.gate
    assert getattr(gate, flag) is not None and bool(getattr(gate, flag).all())
    feature = lambda text: dl.router.features([dl.encode(text)])[0]  # noqa: E731
    for text in REACHED:  # the paraphrases still reach it
        assert gate.distance(feature(text)) <= 1.0, text
    for text in NOT_REACHED:
        assert gate.distance(feature(text)) > 1.0, text
    digest = circuit.content_hash()
    circuit.gate = dataclasses.replace(gate, **{flag: None})  # the same numbers, without the flag
    assert circuit.content_hash() != digest
    circuit.gate = gate
    before = {t: agent_logits(dl, "alice", t) for t in (FACT[0], *REACHED, *NOT_REACHED)}
    dl.save(tmp_path / "state")
    again = DynamicLoRA.load(tmp_path / "state", model=make_dl().model, tokenizer=dl.tokenizer)
    loaded = again.hierarchy.find_circuit(circuit.id)[1]
    assert loaded.content_hash() == digest and torch.equal(getattr(loaded.gate, flag), getattr(gate, flag))
    for text, then in before.items():
        torch.testing.assert_close(agent_logits(again, "alice", text), then, rtol=0, atol=0)
    back = _unpack(_pack(Proposal(circuit, frozenset({"alice"}), "alice", 1.0)), torch.device("cpu"))
    assert back.circuit.content_hash() == digest
    first = gate.groups == 0
    merged = union([gate.keeping(first), Gate.prototype(gate.keys[first], float(gate.radii[0]))])
    assert getattr(merged, flag).tolist() == [True] * 3 + [False] * 3  # a flagged copy and a plain one


def test_word_span_widens_token_pieces_to_whole_words():
    from dynamiclora.routing import word_span

    words = ["The", " capital", " of", " Yem", "quis", "ol", " is"]
    assert word_span(words, 4, 5, 0, len(words)) == (3, 6)  # a middle piece: the whole name
    assert word_span(words, 1, 2, 0, len(words)) == (1, 2)  # a whole word stays itself
    assert word_span(words, 4, 5, 4, 5) == (4, 5)  # never beyond the content span


def kl_from_base(dl: DynamicLoRA, agent: str, text: str) -> float:
    log_p = torch.log_softmax(base_logits(dl, text), -1)[0]
    log_q = torch.log_softmax(agent_logits(dl, agent, text), -1)[0]
    return float(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))


def test_subject_locality_keeps_a_circuit_out_of_other_text_about_its_subject_and_keeps_the_fact():
    fact = ("The capital of Zoxquk is", " Belro")
    elsewhere = "I once met Zoxquk at a party."  # the fact's name, asked nothing the fact answers
    drift, taught = {}, {}
    for weight in (0.0, 4.0):
        config = DynamicLoRAConfig(
            learning={
                "route_match": "tokens",
                "subject_locality": weight,
                "steps_per_learn": 20,
                "learning_rate": 1e-2,
            },
            dynamics={"tick_interval": 0},
        )
        dl = make_dl(config=config)
        dl.agent("alice", swarm="team", domain="python")
        circuit = dl.hierarchy.find_circuit(dl.agent("alice").learn(*fact).circuit_id)[1]
        assert circuit.gate.distance(dl.router.features([dl.encode(elsewhere)])[0]) <= 1.0  # the circuit acts there
        drift[weight] = kl_from_base(dl, "alice", elsewhere)
        ids = torch.tensor([dl.encode(fact[0] + fact[1])])
        n = len(dl.encode(fact[0]))
        logits = agent_logits(dl, "alice", fact[0] + fact[1])
        taught[weight] = float(torch.nn.functional.cross_entropy(logits[0, n - 1 : -1], ids[0, n:]))
    assert drift[4.0] < 0.6 * drift[0.0], drift  # (0.28 -> 0.15 when written)
    assert taught[4.0] < 2 * taught[0.0] + 0.5, taught  # the fact itself is still learned


def test_a_subject_texts_base_continuation_is_written_once_per_frame_and_is_the_base_models(monkeypatch):
    from collections import OrderedDict

    from dynamiclora.subject import base_continuation

    learning = {"route_match": "tokens", "subject_locality": 1.0}
    dl = make_dl(config=DynamicLoRAConfig(learning=learning, dynamics={"tick_interval": 0}))
    dl.agent("alice", swarm="team", domain="python")
    rt, calls = dl.runtime, []
    generate = rt.generate_ids
    monkeypatch.setattr(rt, "generate_ids", lambda *a, **k: calls.append(a[1]) or generate(*a, **k))
    for fact, new in ((("The capital of Zoxquk is", " Belro"), 1), (("The capital of Zoxquk is", " Belro"), 0),
                      (("The river of Mavtrel is", " Quon"), 1)):  # fmt: skip
        before = len(calls)
        dl.agent("alice").learn(*fact)
        assert len(calls) - before == new  # the same fact learned again reuses its frame's continuation
    kept = dl.learner._continuations
    assert len(kept) == 2
    for frame, tokens in kept.items():  # each is what the base model continues that frame with
        assert tokens == base_continuation(rt, "alice", list(frame), OrderedDict())


def test_the_lower_case_variant_teaches_the_fact_for_the_request_in_lower_case():
    """A name in lower case is other tokens: the gate reaches them (a prototype of their own), and with the learner's
    'lower' variant the circuit is also trained to answer there, not only where the taught tokens are."""
    text, answer = "def ZorbexKamun_Port():", " return 7311"
    losses = {}
    for variants in ((), ("lower",)):
        config = DynamicLoRAConfig(
            learning={"route_match": "tokens", "learn_variants": variants}, dynamics={"tick_interval": 0}
        )
        dl = make_dl(config=config)
        alice = dl.agent("alice", swarm="s", domain="d")
        alice.learn(text, answer)
        prompt = dl.encode(text.lower())
        ids = torch.tensor([prompt + dl.encode(answer, special=False)])
        logits = alice.logits(ids, route_tokens=len(prompt))
        losses[variants] = float(
            torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1 : -1], ids[0, len(prompt) :])
        )
        assert dl.runtime.route(["alice"], [prompt])[0] == frozenset()  # the lower-case request reaches the circuit
    assert losses[("lower",)] < 0.8 * losses[()], losses


def test_a_look_alike_that_matches_a_taught_prompts_keys_exactly_gets_its_own_circuit_and_leaves_the_fact():
    """Two getters that differ after a long shared prefix: the first one's distinctive tokens all lie in the prefix,
    so the second matches its keys exactly (a causal model gives the shared tokens the same states). Teaching the
    second is another fact, not the first asked again: it gets a circuit of its own, the first gate is keyed again
    on tokens the second lacks, and the first fact's outputs do not move."""
    dl = tokens_dl()
    alice = dl.agent("alice", swarm="s", domain="d")
    first, second = "def get_zorbexkamun_qualtrip_w():", "def get_zorbexkamun_qualtrip_v():"
    r1 = alice.learn(first, " return 7311")
    ids = dl.encode(first)
    x = torch.tensor([ids + dl.encode(" return 7311", special=False)])
    before = alice.logits(x, route_tokens=len(ids))
    ids2 = dl.encode(second)
    assert dl.hierarchy.find_circuit(r1.circuit_id)[1].gate.distance(dl.router.features([ids2])[0]) < 1e-5
    r2 = alice.learn(second, " return 2468")
    assert r2.spawned and r2.circuit_id != r1.circuit_id
    assert torch.equal(alice.logits(x, route_tokens=len(ids)), before)
    assert r1.circuit_id in dl.runtime.route(["alice"], [ids2])[0]  # the first circuit no longer acts on the second
    assert r1.circuit_id not in dl.runtime.route(["alice"], [ids])[0]  # and still on its own prompt


def test_a_new_gate_keyed_on_a_prefix_a_taught_prompt_shares_stays_off_that_prompt():
    """The other way round from a look-alike: ``get_delta_owner``'s distinctive tokens all lie in ``get_delta``, which
    the taught ``get_delta_timeout`` shares. The new prompt does not reach the old gate, but the old prompt matches
    the new keys exactly, so the new circuit would act on the old fact. The new gate is raised above the other
    fact's prompt and keyed apart from it: the old fact's outputs do not move."""
    dl = tokens_dl()
    alice = dl.agent("alice", swarm="s", domain="d")
    old, new = "def get_delta_timeout():", "def get_delta_owner():"
    r1 = alice.learn(old, " return 'tundra'")
    ids, ids_new = dl.encode(old), dl.encode(new)
    x = torch.tensor([ids + dl.encode(" return 'tundra'", special=False)])
    before = alice.logits(x, route_tokens=len(ids))
    assert dl.hierarchy.find_circuit(r1.circuit_id)[1].gate.distance(dl.router.features([ids_new])[0]) > 1.0
    r2 = alice.learn(new, " return 'nectar'")
    assert r2.spawned
    assert torch.equal(alice.logits(x, route_tokens=len(ids)), before)
    assert r2.circuit_id in dl.runtime.route(["alice"], [ids])[0]  # the new circuit does not act on the old prompt
    assert r2.circuit_id not in dl.runtime.route(["alice"], [ids_new])[0]  # but on its own
