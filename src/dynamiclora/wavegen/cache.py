"""The tiered generation cache: foundation, domain, swarm and agent tiers (the context tier has none).

An entry is a prompt's continuation stored under the provenance hash of its tier (see signature.py). Lookup
runs from the deepest, most stable tier (foundation) to the shallowest (agent), exactly by (prompt key,
provenance), or — never served without verification — by the nearest semantic vector of equal provenance.
The tier an entry is stored in is chosen by universality: how many distinct agents of a swarm, swarms of a
domain, and domains asked for the same prompt.

Invalidation follows the scopes: when a scope's content changes, every entry that depends on it goes
(foundation → all; domain[d] → d's entries; swarm[s] → s's; agent[a] → a's agent-tier entries; context →
none). Correctness does not rest on it: a changed scope changes the provenance, so an entry stored under
the old content cannot be found any more. Invalidation frees the memory.

Eviction when a tier is full: ``lru`` drops the least recently used entry; ``weighted_lru`` drops the entry
with the lowest ``last_used + hit_weight · hits`` (an operation clock), so proven entries outlive one-offs.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import CACHE_TIERS, WaveGenConfig
from ..hierarchy import AgentInfo, Hierarchy
from .index import VectorIndex
from .signature import depends_on

MAX_REQUESTERS = 64  # (agent, swarm, domain) kept per prompt for the universality count
MAX_PROMPTS = 100_000  # prompts whose requesters are remembered


def entry_id(prompt_key: str, provenance: str) -> str:
    return hashlib.sha256(f"{prompt_key}:{provenance}".encode()).hexdigest()[:32]


@dataclass
class CacheEntry:
    tier: str
    prompt_key: str
    provenance: str
    prompt_ids: list[int]
    tokens: list[int]  # the continuation (EOS included when the generation stopped on it)
    text: str
    agent: str  # the agent whose generation this is
    swarm: str
    domain: str
    sampling: str
    syntactic: str  # rank-pattern hash
    coherence: float
    vector: torch.Tensor | None = None  # semantic vector (unit length)
    hits: int = 0
    lookups: int = 1  # the miss that stored the entry was its first lookup
    drafted: int = 0  # draft tokens offered when served by verification
    accepted: int = 0  # of which the model accepted
    last_used: int = 0  # operation clock
    created: int = 0
    circuit_ids: list[str] = field(default_factory=list)  # context circuits that learned this continuation
    failures: int = 0  # failed internalizations
    retry_after: int = 0  # after a failure: lookups needed before the next attempt
    # True: the tokens are what the stack up to this tier produces, so a requester whose faster tiers do not act
    # on the prompt may be served them without running the model. False: a faster tier of the storing agent took
    # part, and the tokens are a draft that only verification serves.
    exact: bool = True
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or entry_id(self.prompt_key, self.provenance)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def scopes(self) -> list[str]:
        """The scopes this entry depends on (its tier and the slower ones of its agent's stack)."""
        names = {
            "foundation": "foundation",
            "domain": f"domain:{self.domain}",
            "swarm": f"swarm:{self.swarm}",
            "agent": f"agent:{self.agent}",
        }
        return [names[t] for t in depends_on(self.tier)]

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "vector"}
        out["hit_rate"] = self.hit_rate
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any], vector: torch.Tensor | None) -> CacheEntry:
        fields = {k: v for k, v in record.items() if k != "hit_rate"}
        return cls(vector=vector, **fields)


class CacheTier:
    def __init__(self, name: str, max_size: int, policy: str, threshold: float, hit_weight: float) -> None:
        self.name, self.max_size, self.policy, self.threshold = name, max_size, policy, threshold
        self.hit_weight = hit_weight
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self.semantic: dict[str, VectorIndex] = {}  # provenance -> index of its entries' vectors
        self._heap: list[tuple[float, int, str]] = []  # weighted LRU: (score, clock, id), lazily invalidated
        self.stats = {
            "hits": 0,
            "semantic_hits": 0,
            "rejected": 0,  # hits whose draft verification did not fully accept (not counted as hits)
            "stores": 0,
            "evicted": 0,
            "invalidated": 0,
            "consolidated": 0,
        }

    def __len__(self) -> int:
        return len(self.entries)

    def score(self, e: CacheEntry) -> float:
        return e.last_used + self.hit_weight * e.hits

    def get(self, prompt_key: str, provenance: str) -> CacheEntry | None:
        return self.entries.get(entry_id(prompt_key, provenance))

    def nearest(self, vector: torch.Tensor, provenance: str) -> tuple[CacheEntry, float] | None:
        index = self.semantic.get(provenance)
        found = None if index is None else index.nearest(vector)
        return None if found is None else (self.entries[found[0]], found[1])

    def touch(self, e: CacheEntry, clock: int) -> None:
        e.last_used = clock
        self.entries.move_to_end(e.id)
        if self.policy == "weighted_lru":
            heapq.heappush(self._heap, (self.score(e), clock, e.id))

    def put(self, e: CacheEntry, clock: int) -> list[CacheEntry]:
        """Insert (or replace) an entry; returns the entries evicted to make room."""
        if e.id in self.entries:
            self.remove(e.id)
        e.tier, e.last_used = self.name, clock
        self.insert(e)  # newest entry: most recently used
        self.stats["stores"] += 1
        evicted = []
        while len(self.entries) > self.max_size:
            evicted.append(self.remove(self._victim()))
            self.stats["evicted"] += 1
        if len(self._heap) > 4 * max(len(self.entries), 16):  # drop stale heap records now and then
            self._heap = [(self.score(x), x.last_used, x.id) for x in self.entries.values()]
            heapq.heapify(self._heap)
        return evicted

    def insert(self, e: CacheEntry) -> None:
        """Index an entry (exact and semantic), with its own ``last_used``, as the most recently used one."""
        self.entries[e.id] = e
        if e.vector is not None:
            self.semantic.setdefault(e.provenance, VectorIndex(e.vector.shape[0])).add(e.id, e.vector)
        if self.policy == "weighted_lru":
            heapq.heappush(self._heap, (self.score(e), e.last_used, e.id))

    def _victim(self) -> str:
        if self.policy == "lru":
            return next(iter(self.entries))
        while self._heap:
            score, clock, key = heapq.heappop(self._heap)
            e = self.entries.get(key)
            if e is not None and e.last_used == clock and self.score(e) == score:
                return key
        return min(self.entries.values(), key=self.score).id  # heap exhausted: fall back to a scan

    def remove(self, key: str) -> CacheEntry:
        e = self.entries.pop(key)
        index = self.semantic.get(e.provenance)
        if index is not None:
            index.remove(key)
            if not len(index):
                del self.semantic[e.provenance]
        return e


class TieredCache:
    def __init__(self, config: WaveGenConfig) -> None:
        self.config = config
        self.tiers = {t: CacheTier(t, *config.tier(t), config.hit_weight) for t in CACHE_TIERS}
        self.clock = 0
        self.lookups = 0
        self.misses = 0
        self.drafted = 0  # draft tokens offered by verification, all entries ever served
        self.accepted = 0
        self.requesters: OrderedDict[str, list[tuple[str, str, str]]] = OrderedDict()
        self.dependents: dict[str, set[tuple[str, str]]] = {}  # scope -> {(tier, entry id)}
        self.seen: dict[str, tuple[int, str]] = {}  # scope -> (version, content hash) last synced
        # what changed since the last save (see store.Writer): entries by (tier, id), prompts' requesters
        self._changed: dict[tuple[str, str], CacheEntry] = {}
        self._gone: set[tuple[str, str]] = set()
        self._asked: dict[str, None] = {}  # in the order of their last request
        self._dropped: set[str] = set()

    # -- lookup -------------------------------------------------------------------------------------
    def lookup(self, prompt_key: str, provenances: dict[str, str]) -> CacheEntry | None:
        """Exact lookup, deepest tier first. Counts the lookup; a hit counts on the entry and its tier."""
        self.clock += 1
        self.lookups += 1
        for tier in CACHE_TIERS:
            e = self.tiers[tier].get(prompt_key, provenances[tier])
            if e is not None:
                self._hit(e, semantic=False)
                return e
        return None

    def lookup_semantic(
        self, vector: torch.Tensor, provenances: dict[str, str], threshold: float
    ) -> tuple[CacheEntry, float] | None:
        """Nearest cached prompt of equal provenance with cosine ≥ threshold, deepest tier first (no counting)."""
        best = None
        for tier in CACHE_TIERS:
            found = self.tiers[tier].nearest(vector, provenances[tier])
            if found is not None and found[1] >= threshold and (best is None or found[1] > best[1]):
                best = found
        return best

    def has_semantic(self, provenances: dict[str, str]) -> bool:
        return any(provenances[t] in self.tiers[t].semantic for t in CACHE_TIERS)

    def semantic_hit(self, e: CacheEntry) -> None:
        self._hit(e, semantic=True)

    def served_draft(self, e: CacheEntry, drafted: int, accepted: int, semantic: bool) -> None:
        """Verification's verdict on a served draft. A draft the model did not fully accept is no hit: the entry is
        not what this requester's stack says, so it must not count towards consolidating it."""
        self.mark(e)
        e.drafted += drafted
        e.accepted += accepted
        self.drafted += drafted
        self.accepted += accepted
        if accepted < drafted:
            e.hits -= 1
            tier = self.tiers[e.tier]
            tier.stats["semantic_hits" if semantic else "hits"] -= 1
            tier.stats["rejected"] += 1

    def miss(self) -> None:
        self.misses += 1

    def mark(self, e: CacheEntry) -> None:
        """An entry changed (or is new): the next save writes it."""
        key = (e.tier, e.id)
        self._gone.discard(key)
        self._changed[key] = e

    def _mark_gone(self, e: CacheEntry) -> None:
        key = (e.tier, e.id)
        self._changed.pop(key, None)
        self._gone.add(key)

    def take_changes(self, everything: bool = False) -> tuple[list[CacheEntry], set[tuple[str, str]]]:
        """The entries to write and the (tier, id) keys to delete since the last call (all entries if
        ``everything``); the record starts afresh."""
        entries = self.entries() if everything else list(self._changed.values())
        gone = set() if everything else set(self._gone)
        self._changed, self._gone = {}, set()
        return entries, gone

    def take_request_changes(self, everything: bool = False) -> tuple[list[tuple[str, list]], set[str]]:
        """Prompts whose requesters changed (in request order) and prompts no longer remembered."""
        if everything:
            asked = list(self.requesters.items())
            dropped: set[str] = set()
        else:
            asked = [(k, self.requesters[k]) for k in self._asked if k in self.requesters]
            dropped = set(self._dropped)
        self._asked, self._dropped = {}, set()
        return asked, dropped

    def restore_changes(self, entries, gone, asked, dropped) -> None:
        """Put back changes taken for a save that did not commit."""
        for e in entries:
            self._changed.setdefault((e.tier, e.id), e)
        self._gone |= gone - set(self._changed)
        self._asked = {**{k: None for k, _ in asked}, **self._asked}
        self._dropped |= dropped

    def _hit(self, e: CacheEntry, semantic: bool) -> None:
        self.mark(e)
        e.hits += 1
        e.lookups += 1
        tier = self.tiers[e.tier]
        tier.stats["semantic_hits" if semantic else "hits"] += 1
        tier.touch(e, self.clock)

    # -- storing ------------------------------------------------------------------------------------
    def record_request(self, prompt_key: str, info: AgentInfo) -> None:
        who = self.requesters.setdefault(prompt_key, [])
        self.requesters.move_to_end(prompt_key)
        self._asked.pop(prompt_key, None)
        self._asked[prompt_key] = None
        self._dropped.discard(prompt_key)
        if (info.id, info.swarm, info.domain) not in who and len(who) < MAX_REQUESTERS:
            who.append((info.id, info.swarm, info.domain))
        while len(self.requesters) > MAX_PROMPTS:
            old, _ = self.requesters.popitem(last=False)
            self._asked.pop(old, None)
            self._dropped.add(old)

    def store_tier(self, prompt_key: str, info: AgentInfo) -> str:
        """The tier chosen by universality: distinct domains, swarms of this domain, agents of this swarm."""
        cfg, who = self.config, self.requesters.get(prompt_key, [])
        if len({d for _, _, d in who}) >= cfg.foundation_min_domains:
            return "foundation"
        if len({s for _, s, d in who if d == info.domain}) >= cfg.domain_min_swarms:
            return "domain"
        if len({a for a, s, _ in who if s == info.swarm}) >= cfg.swarm_min_agents:
            return "swarm"
        return "agent"

    def store(self, e: CacheEntry) -> list[CacheEntry]:
        self.clock += 1
        e.created = self.clock
        evicted = self.tiers[e.tier].put(e, self.clock)
        self._depend(e)
        for old in evicted:
            self._forget_dependents(old)
            self._mark_gone(old)
        self.mark(e)
        return evicted

    def forget_agent(self, agent_id: str) -> int:
        """Evict the agent's entries and take its name out of who asked for each prompt; returns the entries."""
        mine = [e for e in self.entries() if e.agent == agent_id]
        for e in mine:
            self.evict(e)
        for key, who in list(self.requesters.items()):
            kept = [w for w in who if w[0] != agent_id]
            if len(kept) == len(who):
                continue
            if kept:
                self.requesters[key] = kept
                self._asked[key] = None
            else:
                del self.requesters[key]
                self._asked.pop(key, None)
                self._dropped.add(key)
        return len(mine)

    def evict(self, e: CacheEntry) -> None:
        self._forget_dependents(self.tiers[e.tier].remove(e.id))
        self._mark_gone(e)

    def _depend(self, e: CacheEntry) -> None:
        for scope in e.scopes():
            self.dependents.setdefault(scope, set()).add((e.tier, e.id))

    def _forget_dependents(self, e: CacheEntry) -> None:
        for scope in e.scopes():
            deps = self.dependents.get(scope)
            if deps is not None:
                deps.discard((e.tier, e.id))
                if not deps:
                    del self.dependents[scope]

    # -- invalidation -------------------------------------------------------------------------------
    def invalidate(self, scope: str) -> int:
        """Evict every entry that depends on ``scope`` (context scopes have none)."""
        n = 0
        for tier, key in sorted(self.dependents.pop(scope, ())):
            t = self.tiers[tier]
            if key in t.entries:
                gone = t.remove(key)
                self._forget_dependents(gone)
                self._mark_gone(gone)
                t.stats["invalidated"] += 1
                n += 1
        return n

    def sync(self, hierarchy: Hierarchy) -> dict[str, int]:
        """Invalidate after every scope whose content changed since the last sync; returns evictions per scope."""
        out = {}
        for key, scope in hierarchy.scopes.items():
            if key.tier == "context":
                continue
            name = str(key)
            seen = self.seen.get(name)
            if seen is not None and seen[0] == scope.version:
                continue
            digest = scope.content_hash()
            if seen is not None and seen[1] != digest:
                out[name] = self.invalidate(name)
            self.seen[name] = (scope.version, digest)
        return out

    # -- reporting and persistence ------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        return [e for t in self.tiers.values() for e in t.entries.values()]

    def statistics(self) -> dict[str, Any]:
        hits = sum(t.stats["hits"] + t.stats["semantic_hits"] for t in self.tiers.values())
        return {
            "lookups": self.lookups,
            "hits": hits,
            "misses": self.misses,
            "hit_rate": hits / self.lookups if self.lookups else 0.0,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "tiers": {
                name: {
                    "entries": len(t),
                    "max_size": t.max_size,
                    "eviction": t.policy,
                    "consolidation_threshold": t.threshold,
                    "hit_rate": (t.stats["hits"] + t.stats["semantic_hits"]) / self.lookups if self.lookups else 0.0,
                    **t.stats,
                }
                for name, t in self.tiers.items()
            },
        }

    def state(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "lookups": self.lookups,
            "misses": self.misses,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "stats": {name: dict(t.stats) for name, t in self.tiers.items()},
        }

    def restore(
        self,
        state: dict[str, Any],
        entries: list[CacheEntry],
        requesters: list[tuple[str, list[tuple[str, str, str]]]],
        hierarchy: Hierarchy,
    ) -> None:
        """Restore a state saved after :meth:`sync` (so its entries match the scopes as saved)."""
        for name in ("clock", "lookups", "misses", "drafted", "accepted"):
            setattr(self, name, state.get(name, 0))
        self.requesters = OrderedDict(requesters)
        for name, stats in state.get("stats", {}).items():
            if name in self.tiers:
                self.tiers[name].stats.update(stats)
        for e in sorted(entries, key=lambda e: e.last_used):
            self.tiers[e.tier].insert(e)
            self._depend(e)
        self.seen = {}
        self.sync(hierarchy)  # records the hashes as loaded: the saved entries were synced to them
        self._changed, self._gone, self._asked, self._dropped = {}, set(), {}, set()
