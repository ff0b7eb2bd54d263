"""Tiny models built in process, in seconds, for tests, the fast demo and quick benchmarks.

``tiny_model("llama")`` and ``tiny_model("gpt2")`` return a randomly initialised Transformers causal LM
(deterministic from ``seed``) and a byte-level BPE tokenizer trained on a few standard-library files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import ConfigError
from .stdlib_model import read_texts, stdlib_files, train_tokenizer

Arch = Literal["llama", "gpt2", "qwen2"]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512):
    files = stdlib_files()[0][:40]
    return train_tokenizer(read_texts(files), vocab_size)


# No pad_token_id: an embedding's padding row starts at zero, and with tied embeddings that pins the
# logit of EOS (which doubles as pad here) at zero forever. Padding is the tokenizer's business anyway.
def tiny_config(
    arch: Arch = "llama",
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    eos_id: int = 0,
) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=max_positions,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=arch == "qwen2",  # one untied and one tied head among the test models
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )
    raise ConfigError(f"unknown tiny architecture {arch!r}; choose llama, qwen2 or gpt2")


# Random weights at the usual std 0.02 give a tiny model logits within about ±1, so no token can ever
# become confident and a tied head cannot learn to stop; a wider init gives it a usable logit range.
TINY_INIT_RANGE = 0.1


def tiny_model(arch: Arch = "llama", seed: int = 0, **config_kwargs: Any):
    """(model, tokenizer): a random tiny causal LM in eval mode and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(config_kwargs.pop("vocab_size", 512))
    config = tiny_config(arch, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id, **config_kwargs)
    config.initializer_range = TINY_INIT_RANGE
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


#: A minimal chat template for tiny tokenizers (which have none): what the fast demo and chat tests converse through.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"


def tiny_chat_model(arch: Arch = "llama", seed: int = 0, **config_kwargs: Any):
    """(model, tokenizer) as ``tiny_model``, the tokenizer a copy carrying :data:`CHAT_TEMPLATE`."""
    import copy

    model, tokenizer = tiny_model(arch, seed, **config_kwargs)
    tokenizer = copy.deepcopy(tokenizer)  # the tiny tokenizer is shared; templates are per model here
    tokenizer.chat_template = CHAT_TEMPLATE
    return model, tokenizer


def save_tiny_model(
    directory: str | Path, arch: Arch = "llama", seed: int = 0, chat: bool = False, **config_kwargs: Any
) -> Path:
    """Write a tiny model + tokenizer in Hugging Face format (for from_pretrained and PEFT round trips); with
    ``chat``, the tokenizer carries :data:`CHAT_TEMPLATE`."""
    model, tokenizer = (tiny_chat_model if chat else tiny_model)(arch, seed, **config_kwargs)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
