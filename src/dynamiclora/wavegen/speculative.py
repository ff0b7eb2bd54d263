"""Serving a cached continuation as a draft: keep the prefix the model itself would have produced.

``logits`` holds ``n + 1`` rows for a draft of ``n`` tokens: row i is the model's next-token logits after the
prompt and the first i draft tokens (row 0 comes from the prefill, rows 1…n from one forward pass over the
draft). Greedy: accept while the argmax equals the draft token; the first disagreement is replaced by the
argmax, so the result is exactly greedy decoding. Sampling: the draft is a point mass q = δ(x), so the
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) accepts x with probability
min(1, p(x)/q(x)) = p(x) and on rejection samples from the residual max(0, p − q) ∝ p without x, which
leaves every token's distribution exactly p. Seeded sampling (``cfg.seed``): the row's own generator draws one
token per position, as seeded decoding does, and the draft is accepted while it agrees, so the result is exactly
the seeded decode (like greedy, and unlike the rule above, which keeps only the distribution).
"""

from __future__ import annotations

import torch

from ..config import GenerationConfig
from ..generation import probabilities


def accept(
    logits: torch.Tensor, draft: list[int], cfg: GenerationConfig, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(number of draft tokens accepted, the next token after them) for logits (n + 1, V) of a draft of n."""
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(
            f"need {len(draft) + 1} rows of logits for a draft of {len(draft)} tokens, got {logits.shape[0]}"
        )
    if cfg.greedy:
        best = logits.argmax(-1).tolist()
        for i, token in enumerate(draft):
            if best[i] != token:
                return i, best[i]
        return len(draft), best[len(draft)]
    probs = probabilities(logits, cfg).cpu()
    if cfg.seed is not None:  # a seed names the tokens: accept exactly what seeded decoding draws, one per step
        for i in range(len(draft) + 1):
            token = int(torch.multinomial(probs[i : i + 1], 1, generator=generator))
            if i == len(draft) or token != draft[i]:
                return i, token
    for i, token in enumerate(draft):
        p = probs[i]
        if float(torch.rand((), generator=generator)) < float(p[token]):
            continue
        residual = p.clone()
        residual[token] = 0.0
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generator))
