"""The built-in model's build path, on a miniature spec: corpus, tokenizer, training, atomic publish, cache."""

from __future__ import annotations

import json

from dynamiclora import DynamicLoRA
from dynamiclora.stdlib_model import StdlibModelSpec, ensure_stdlib_model, held_out_texts, stdlib_files

MINI = StdlibModelSpec(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    max_positions=64,
    seq_len=32,
    batch_size=2,
    steps=3,
    warmup_steps=1,
    tokenizer_corpus_bytes=50_000,
    max_train_files=3,
    bf16=False,
)


def test_build_publish_cache_and_load(tmp_path):
    path = ensure_stdlib_model(tmp_path, MINI, progress=False)
    assert path.name == f"stdlib-model-{MINI.digest()}"
    meta = json.loads((path / "dynamiclora_stdlib.json").read_text())
    assert meta["spec"]["steps"] == 3 and len(meta["loss_curve"]) >= 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # published by rename, nothing half-written
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_stdlib_model(tmp_path, MINI, progress=False) == path  # cached: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    dl = DynamicLoRA.from_pretrained(path)  # the ordinary Hugging Face path
    assert dl.tokenizer.eos_token == "<|endoftext|>" and len(dl.tokenizer) == 300
    text = dl.agent("a", swarm="s", domain="d").generate("def f(", max_new_tokens=4).text
    assert isinstance(text, str)


def test_spec_digest_changes_with_every_field():
    assert MINI.digest() != StdlibModelSpec().digest()
    assert StdlibModelSpec(seed=1).digest() != StdlibModelSpec().digest()


def test_corpus_split_is_deterministic_and_disjoint():
    train, held = stdlib_files()
    assert train and held and not set(train) & set(held)
    assert stdlib_files() == (train, held)
    assert held_out_texts()
