"""PEFT round trips: export -> PeftModel gives equal logits; a PEFT-trained adapter imports exactly."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dynamiclora import DynamicLoRA, GateLostWarning, IncompatibleAdapterError, UnknownScopeError  # noqa: E402
from dynamiclora.testing import save_tiny_model  # noqa: E402

from .conftest import populate  # noqa: E402

TEAM = {"alice": ("backend", "python"), "carol": ("frontend", "python")}


@pytest.fixture(params=["llama", "gpt2"])
def base_dir(request, tmp_path):
    return save_tiny_model(tmp_path / f"base-{request.param}", request.param)


def peft_logits(base_dir, adapter_dir, ids):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("what", ["stack", "scope"])
def test_export_loads_in_peft_with_equal_logits(base_dir, tmp_path, ids, what):
    dl = DynamicLoRA.from_pretrained(base_dir)
    populate(dl, TEAM, per_scope=2, rank=3)
    dl.agent("alice").learn("def f(x):", " return x")
    out = tmp_path / "adapter"
    if what == "stack":  # a PEFT adapter cannot route: it equals the stack where alice's gated circuit acts
        with pytest.warns(GateLostWarning, match="1 of the .* circuits .* are gated"):
            dl.export_peft(out, agent="alice")
        prompt = dl.encode("def f(x):")
        ids = torch.tensor([prompt + dl.encode(" return x", special=False)])
        expected = dl.agent("alice").logits(ids, route_tokens=len(prompt))
    else:
        dl.export_peft(out, scope="swarm:backend")
        dl.agent("bare", swarm="backend", domain="python")  # its stack, emptied below but for that swarm
        for s in ("foundation", "domain:python"):
            for cid in list(dl.hierarchy.scope(s).circuits):
                dl.hierarchy.scope(s).remove(cid)
        expected = dl.agent("bare").logits(ids)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    torch.testing.assert_close(peft_logits(base_dir, out, ids), expected, rtol=1e-4, atol=1e-4)


def test_peft_trained_adapter_imports_with_peft_logits(base_dir, tmp_path, ids):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["q_proj", "v_proj", "down_proj"] if "llama" in base_dir.name else ["c_attn", "c_fc"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=0.0,
        rank_pattern={targets[0]: 2},
        alpha_pattern={targets[0]: 3},
        fan_in_fan_out="gpt2" in base_dir.name,
    )
    pm = get_peft_model(model, config)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # a few real training steps so that B is not zero
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path / "trained")
    expected = peft_logits(base_dir, tmp_path / "trained", ids)

    dl = DynamicLoRA.from_pretrained(base_dir)
    dl.agent("alice", swarm="s", domain="python")
    circuit = dl.import_peft(tmp_path / "trained", scope="domain:python")
    assert circuit.tier == "domain" and len(circuit.factors) == len(targets) * 2
    torch.testing.assert_close(dl.agent("alice").logits(ids), expected, rtol=1e-4, atol=1e-4)


def test_rslora_scaling_is_respected(tmp_path, ids):
    base = save_tiny_model(tmp_path / "base")
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "rs")
    dl = DynamicLoRA.from_pretrained(base)
    dl.agent("a", swarm="s", domain="d")
    dl.import_peft(tmp_path / "rs")
    torch.testing.assert_close(
        dl.agent("a").logits(ids), peft_logits(base, tmp_path / "rs", ids), rtol=1e-4, atol=1e-4
    )


def test_import_errors_name_the_problem(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    dl = DynamicLoRA.from_pretrained(base)
    with pytest.raises(IncompatibleAdapterError, match="adapter_config.json is missing"):
        dl.import_peft(tmp_path)
    other = save_tiny_model(tmp_path / "wide", hidden=32)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "wide-adapter")
    with pytest.raises(IncompatibleAdapterError, match="trained on another base model"):
        dl.import_peft(tmp_path / "wide-adapter")


def test_export_of_an_empty_scope_is_refused(tmp_path):
    dl = DynamicLoRA.from_pretrained(save_tiny_model(tmp_path / "base"))
    dl.agent("a", swarm="s", domain="d")
    with pytest.raises(UnknownScopeError, match="holds no circuits"):
        dl.export_peft(tmp_path / "x", scope="swarm:s")
    with pytest.raises(ValueError, match="exactly one of"):
        dl.export_peft(tmp_path / "x")


def test_an_export_without_gated_circuits_equals_the_memory_where_no_gate_is_reached(tmp_path, recwarn):
    base_dir = save_tiny_model(tmp_path / "base")
    dl = DynamicLoRA.from_pretrained(base_dir)
    populate(dl, TEAM, per_scope=2, rank=3)  # ungated circuits in every shared scope
    dl.agent("alice").learn("def f(x):", " return x")  # one gated context circuit
    dl.export_peft(tmp_path / "without", agent="alice", gated="exclude")
    assert not [w for w in recwarn if issubclass(w.category, GateLostWarning)]
    manifest = json.loads((tmp_path / "without" / "dynamiclora_export.json").read_text())
    gated = [c for c in manifest["circuits"] if c["gated"]]
    assert manifest["gates_lost"] == 0 and len(gated) == 1 and not gated[0]["written"]
    assert gated[0]["scope"] == "context:alice" and "def f(x):" in gated[0]["label"]
    assert sum(c["written"] for c in manifest["circuits"]) == len(manifest["circuits"]) - 1
    unrelated = torch.tensor([dl.encode("import os\nprint(1)")])  # reaches no gate: the memory is its ungated part
    exported = peft_logits(base_dir, tmp_path / "without", unrelated)
    torch.testing.assert_close(exported, dl.agent("alice").logits(unrelated), rtol=1e-4, atol=1e-4)
    with pytest.warns(GateLostWarning):
        dl.export_peft(tmp_path / "with", agent="alice")
    lost = json.loads((tmp_path / "with" / "dynamiclora_export.json").read_text())
    assert lost["gates_lost"] == 1 and all(c["written"] for c in lost["circuits"])
    with pytest.raises(ValueError, match="gated must be one of"):
        dl.export_peft(tmp_path / "x", agent="alice", gated="drop")
    dl.agent("erin", swarm="backend", domain="python").learn("SELECT 1;", " -- one")  # its context: one gated
    with pytest.raises(UnknownScopeError, match="gated ones left out"):
        dl.export_peft(tmp_path / "x", scope="context:erin", gated="exclude")
