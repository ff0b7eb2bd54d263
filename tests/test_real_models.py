"""End to end on real pretrained models from PyPI packages (slow: models of 135M and 268M parameters on CPU):
SmolLM2-135M-Instruct (Llama architecture, the default model) and Gemma-3-270m (Gemma 3: sliding-window
attention, a 262k vocabulary). Each is skipped where its package is not installed (`make` and `.ci/run` install
both)."""

from __future__ import annotations

import pytest
import torch

from dynamiclora.packaged import PACKAGED, ensure_packaged, installed

pytestmark = pytest.mark.slow

PROMPT, ANSWER = "def get_alpha_port():", " return 'cedar'"
MODELS = [
    pytest.param(key, marks=pytest.mark.skipif(not installed(key), reason=f"{PACKAGED[key].install} to run it"))
    for key in ("smollm2", "gemma3-270m")
]


@pytest.fixture(scope="module", params=MODELS)
def model_dir(request, tmp_path_factory):
    return request.param, ensure_packaged(request.param, tmp_path_factory.mktemp("models"), progress=False)


def test_learns_serves_ticks_saves_and_exports(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dynamiclora import DynamicLoRA, DynamicLoRAConfig

    key, path = model_dir
    config = DynamicLoRAConfig(wavegen={"min_coherence": 0.0}, dynamics={"tick_interval": 0})
    dl = DynamicLoRA.from_pretrained(path, config)
    assert sum(p.numel() for p in dl.model.parameters()) > 100e6
    alice = dl.agent("alice", swarm="team", domain="python")
    base = alice.generate("def parse_json(text):", max_new_tokens=12, use_cache=False).text
    assert "json" in base.lower() or "parse" in base.lower(), base  # a real model: it knows the task
    for _ in range(4):
        alice.learn(PROMPT, ANSWER)
        if alice.generate(PROMPT, max_new_tokens=8, use_cache=False).text.startswith(ANSWER):
            break
    assert alice.generate(PROMPT, max_new_tokens=8, use_cache=False).text.startswith(ANSWER)
    bystander = dl.agent("bob", swarm="other", domain="python")
    assert (
        bystander.generate(PROMPT, max_new_tokens=8, use_cache=False).text
        != alice.generate(PROMPT, max_new_tokens=8, use_cache=False).text
    )
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
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    with torch.no_grad():
        # many layers of fp32 in another order of operations: logits of size ~20 agree to about 2e-4
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-3)
