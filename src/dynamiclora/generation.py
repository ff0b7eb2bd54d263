"""Autoregressive decoding with the model's KV cache, greedy or sampled, for a batch of rows.

Prompts of different lengths are left-padded; position ids are computed from the attention mask so
that a padded row sees exactly the positions it would see alone. The adapted layers see the stack
plan the caller activated around the whole loop.

Decoding is split into :func:`prefill` (the prompt in one pass) and :func:`run` (one token per step
from a :class:`DecodeState`), so that a caller can stop in between — WaveGen feeds a cached draft
after the prefill, keeps the prefix the model accepts, and resumes the loop from there.

:func:`join` and :func:`keep_rows` change a decode's rows between steps (continuous batching, see
server.scheduler): rows prefilled later are left-padded to the running rows' length, finished rows
leave, and columns no remaining row attends to are cut. A row's keys and values do not move relative to
its own tokens, and its padding is masked, so its logits are those it has alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from .config import GenerationConfig

# forward(input_ids, attention_mask, position_ids, past_key_values) -> (last logits (B, V), past)
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, object]]
# observer(next-token logits (B, V), chosen tokens (B,), rows still running (B,) bool), called once per step
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per row (EOS included when emitted)
    finished: list[bool]  # row stopped on EOS


@dataclass
class DecodeState:
    """Where a decode stands: the tokens so far, the KV cache over them, and the logits of the next token."""

    ids: torch.Tensor  # (B, T) prompt (left-padded) and every token fed so far
    mask: torch.Tensor  # (B, T)
    past: object  # the model's KV cache over ``ids``
    logits: torch.Tensor  # (B, V) logits of the next token
    out: list[list[int]]  # generated tokens per row
    done: torch.Tensor  # (B,) bool: row finished


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


def probabilities(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """The sampling distribution (…, V) that ``cfg`` defines on these logits: temperature, then top-k, then top-p."""
    logits = logits.float()
    # the best logit becomes 0 before dividing, so that no temperature overflows it; below float32's range
    # (1e-30 here) every temperature is the same distribution: the likeliest tokens
    logits = (logits - logits.amax(-1, keepdim=True)) / max(cfg.temperature, 1e-30)
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # and always the likeliest token (a top_p that rounds to 0 in float32 kept none)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


Generators = torch.Generator | Sequence[torch.Generator] | None


def row_generators(cfg: GenerationConfig, rows: int, source: torch.Generator) -> list[torch.Generator] | None:
    """One generator per row for sampling (None for greedy): seeded with ``cfg.seed``, or each with a fresh seed
    drawn from ``source``. A row's draws then depend on its own seed only, never on its batch-mates."""
    if cfg.greedy:
        return None
    seeds = [
        cfg.seed if cfg.seed is not None else int(torch.randint(2**62, (), generator=source)) for _ in range(rows)
    ]
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: Generators) -> torch.Tensor:
    """Next token per row from last-position logits (B, V); ``generator``: one for the batch, or one per row."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, cfg).cpu()
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
    drawn = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
    return torch.cat(drawn).squeeze(-1).to(logits.device)


def prefill(forward: ForwardFn, prompts: list[list[int]], *, pad_id: int, device: torch.device) -> DecodeState:
    """Run the (left-padded) prompts in one pass; the state holds the first token's logits."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits, past = forward(ids, mask, positions(mask), None)
    rows = len(prompts)
    return DecodeState(
        ids, mask, past, logits, [[] for _ in range(rows)], torch.zeros(rows, dtype=torch.bool, device=device)
    )


def feed(forward: ForwardFn, state: DecodeState, tokens: torch.Tensor, use_kv_cache: bool = True) -> None:
    """Append one token per row (B,) to the state and compute the next logits."""
    state.mask = torch.cat([state.mask, (~state.done).long().unsqueeze(1)], 1)
    state.ids = torch.cat([state.ids, tokens.unsqueeze(1)], 1)
    if use_kv_cache:
        state.logits, state.past = forward(tokens.unsqueeze(1), state.mask, positions(state.mask)[:, -1:], state.past)
    else:
        state.logits, _ = forward(state.ids, state.mask, positions(state.mask), None)


def joinable(state: DecodeState) -> bool:
    """Can this decode's rows join others' and leave one by one? Only a growing, full-length cache: a sliding
    window keeps a different span at every length."""
    layers = getattr(state.past, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers)


def join(states: list[DecodeState], pad_id: int) -> DecodeState:
    """The rows of several decodes as one, each left-padded to the longest with masked positions."""
    if len(states) == 1:
        return states[0]
    width = max(s.ids.shape[1] for s in states)
    gaps = [width - s.ids.shape[1] for s in states]
    ids = torch.cat([F.pad(s.ids, (g, 0), value=pad_id) for s, g in zip(states, gaps)])
    mask = torch.cat([F.pad(s.mask, (g, 0), value=0) for s, g in zip(states, gaps)])
    layers = []
    for i in range(len(states[0].past.layers)):
        keys = torch.cat([F.pad(s.past.layers[i].keys, (0, 0, g, 0)) for s, g in zip(states, gaps)])
        values = torch.cat([F.pad(s.past.layers[i].values, (0, 0, g, 0)) for s, g in zip(states, gaps)])
        layers.append((keys, values))
    return DecodeState(
        ids,
        mask,
        _cache(layers),
        torch.cat([s.logits for s in states]),
        [o for s in states for o in s.out],
        torch.cat([s.done for s in states]),
    )


def keep_rows(state: DecodeState, rows: list[int]) -> DecodeState:
    """Only these rows, without the leading columns that none of them attends to."""
    idx = torch.tensor(rows, dtype=torch.long, device=state.ids.device)
    mask = state.mask[idx]
    used = mask.any(0).nonzero()
    first = int(used[0]) if len(used) else 0
    layers = [(layer.keys[idx, :, first:], layer.values[idx, :, first:]) for layer in state.past.layers]
    return DecodeState(
        state.ids[idx, first:],
        mask[:, first:],
        _cache(layers),
        state.logits[idx],
        [state.out[i] for i in rows],
        state.done[idx],
    )


@torch.no_grad()
def run(
    forward: ForwardFn,
    state: DecodeState,
    cfg: GenerationConfig,
    *,
    pad_id: int,
    eos_id: int | None,
    generator: Generators = None,
    use_kv_cache: bool = True,
    observer: Observer | None = None,
) -> Decoded:
    """Decode from ``state`` until every row has EOS or ``cfg.max_new_tokens`` tokens in ``state.out``."""
    rows = len(state.out)
    for _ in range(cfg.max_new_tokens - max(len(o) for o in state.out)):
        nxt = sample_next(state.logits, cfg, generator)
        nxt = torch.where(state.done, torch.full_like(nxt, pad_id), nxt)
        if observer is not None:
            observer(state.logits, nxt, ~state.done)
        for i in range(rows):
            if not state.done[i]:
                state.out[i].append(int(nxt[i]))
        if eos_id is not None and cfg.stop_at_eos:
            state.done |= nxt == eos_id
        if bool(state.done.all()) or max(len(o) for o in state.out) >= cfg.max_new_tokens:
            break
        feed(forward, state, nxt, use_kv_cache)
    finished = [bool(eos_id is not None and o and o[-1] == eos_id) for o in state.out]
    return Decoded(state.out, finished)


@torch.no_grad()
def decode(
    forward: ForwardFn,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
    generator: Generators = None,
    use_kv_cache: bool = True,
    on_prefill_done: Callable[[], None] | None = None,
    observer: Observer | None = None,
) -> Decoded:
    state = prefill(forward, prompts, pad_id=pad_id, device=device)
    if on_prefill_done is not None:
        on_prefill_done()
    return run(
        forward,
        state,
        cfg,
        pad_id=pad_id,
        eos_id=eos_id,
        generator=generator,
        use_kv_cache=use_kv_cache,
        observer=observer,
    )
