"""Signatures of cached trajectories: what a cache entry is, and under which memory state it holds.

* the **prompt key**: sha256 of the prompt's token ids (exact lookup);
* the **semantic vector**: the prompt's mask-averaged final hidden state under the agent's stack, unit length
  (nearest-neighbour lookup, only ever served through verification);
* the **syntactic hash**: sha256 of the chosen tokens' rank pattern (how the model walked its own distribution);
* the **provenance hash** of a cache tier: sha256 over the base model's and tokenizer's fingerprints, the
  content hashes of exactly the scopes that tier depends on, and the sampling parameters. An entry is found
  only under the provenance it was stored with, so a change of any scope it depends on makes it unreachable
  at once — before invalidation even removes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from ..config import CACHE_TIERS, TIERS, GenerationConfig
from ..errors import ConfigError
from ..hierarchy import Snapshot

RANK_CAP = 9  # ranks above this are one symbol: the pattern describes confidence, not the exact tail


def prompt_key(token_ids: list[int]) -> str:
    return hashlib.sha256(b"prompt:" + ",".join(map(str, token_ids)).encode()).hexdigest()


def rank_pattern_hash(ranks: list[int]) -> str:
    return hashlib.sha256(bytes(min(r, RANK_CAP) for r in ranks)).hexdigest()


def depends_on(cache_tier: str) -> tuple[str, ...]:
    """The LoRA tiers a cache tier's entries depend on: its own tier and every slower one."""
    return TIERS[: TIERS.index(cache_tier) + 1]


def sampling_key(cfg: GenerationConfig) -> str:
    """The parameters that decide which continuation is drawn (not how long it may grow)."""
    fields = {k: v for k, v in asdict(cfg).items() if k != "max_new_tokens"}
    if fields.get("seed") is None:  # unseeded: the keys of states saved before seeds existed stay valid
        fields.pop("seed", None)
    return json.dumps(fields, sort_keys=True)


def provenance(snapshot: Snapshot, cache_tier: str, sampling: str) -> str:
    """Provenance hash of ``cache_tier`` for this snapshot: model, tokenizer, dependent scopes, sampling."""
    if cache_tier not in CACHE_TIERS:
        raise ConfigError(f"unknown cache tier {cache_tier!r}; choose from {CACHE_TIERS}")
    h = hashlib.sha256(b"wavegen-provenance-v1")
    h.update(snapshot.base_fingerprint.encode())
    h.update(snapshot.tokenizer_fingerprint.encode())
    for (scope, digest), tier in zip(snapshot.scope_hashes, TIERS):
        if tier in depends_on(cache_tier):
            h.update(f"{scope}={digest};".encode())
    h.update(sampling.encode())
    return h.hexdigest()
