"""Autoregressive decoding with the model's KV cache, greedy or sampled, for a batch of rows.

Prompts of different lengths are left-padded; position ids are computed from the attention mask so
that a padded row sees exactly the positions it would see alone. The adapted layers see the stack
plan the caller activated around the whole loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import GenerationConfig

# forward(input_ids, attention_mask, position_ids, past_key_values) -> (last logits (B, V), past)
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, object]]


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per row (EOS included when emitted)
    finished: list[bool]  # row stopped on EOS


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits (B, V)."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def decode(
    forward: ForwardFn,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    on_prefill_done: Callable[[], None] | None = None,
) -> Decoded:
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    rows = len(prompts)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    logits, past = forward(ids, mask, positions(mask), None)
    if on_prefill_done is not None:
        on_prefill_done()
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for i in range(rows):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if eos_id is not None and cfg.stop_at_eos:
            done |= nxt == eos_id
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done).long().unsqueeze(1)], 1)
        ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
        if use_kv_cache:
            pos = positions(mask)[:, -1:]
            logits, past = forward(nxt.unsqueeze(1), mask, pos, past)
        else:
            logits, _ = forward(ids, mask, positions(mask), None)
    finished = [bool(eos_id is not None and o and o[-1] == eos_id) for o in out]
    return Decoded(out, finished)
