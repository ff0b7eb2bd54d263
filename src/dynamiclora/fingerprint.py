"""Content fingerprints of the base model and the tokenizer (parts of every provenance hash)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from .circuits import tensor_digest


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the model, by sorted name.

    Names are taken as in the unwrapped model (``.base_layer`` segments of adapted layers removed), so a
    model gives the same fingerprint before and after DynamicLoRA wraps its layers.
    """
    h = hashlib.sha256(b"model")
    state = {name.replace(".base_layer.", "."): t for name, t in model.state_dict().items()}
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        tensor_digest(h, tensor)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full serialized form when it has one, else of its vocabulary and specials; and of
    its chat template, where it has one."""
    h = hashlib.sha256(b"tokenizer")
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:  # it decides what a conversation's tokens are, and where routing pools
        h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()
