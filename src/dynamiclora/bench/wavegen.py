"""WaveGen benchmark: lookup latency at the seed's full cache size, hit serving against generation, and hit and
acceptance rates on a repeated (Zipf) workload of several agents.

Run: ``python benchmarks/wavegen.py`` (``--quick``: tiny random model, fewer requests).
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from ..circuits import Circuit
from ..config import CACHE_TIERS, DynamicLoRAConfig
from ..core import DynamicLoRA
from ..wavegen.cache import CacheEntry
from ..wavegen.signature import prompt_key, provenance, sampling_key
from .record import arguments, model_label, model_suffix, model_under_test, time_interleaved, write

SNIPPETS = [
    "import json\n\ndef parse_json(text):\n",
    "def read_config(path):\n",
    "class Parser:\n    def __init__(self",
    "import os\n\ndef walk(top):\n",
    "def main():\n    args = ",
    "for i in range(10):\n",
    "with open(path) as f:\n",
    "def __repr__(self):\n",
    "try:\n    import threading\nexcept ImportError:\n",
    "def encode(self, text):\n",
    "if __name__ == '__main__':\n",
    "class Error(Exception):\n",
    "def copy(self):\n",
    "import sys\n\ndef exit(code):\n",
    "def join(a, *p):\n",
    "def split(s, sep=None):\n",
]


def build(quick: bool, **wavegen) -> DynamicLoRA:
    return model_under_test(
        quick, DynamicLoRAConfig(wavegen={"min_coherence": 0.0, **wavegen}, dynamics={"tick_interval": 100})
    )


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def lookup_latency(dl: DynamicLoRA, quick: bool) -> list[dict]:
    """p50/p99 of the lookup path (snapshot, provenance per tier, prompt key, lookup) with every tier full
    (1,000 + 5,000 + 10,000 + 20,000 = 36,000 entries). 'many agents': entries spread over 64 agents, 8 swarms,
    2 domains; 'one agent': every entry under one agent (the largest semantic index to search)."""
    sizes = dict(zip(CACHE_TIERS, dl.config.wavegen.max_sizes))
    if quick:
        sizes = {t: n // 10 for t, n in sizes.items()}
    dim = dl.model.config.hidden_size
    sampling = sampling_key(dl.config.generation)
    rows = []
    for layout, agents in (("many agents", 64), ("one agent", 1)):
        for i in range(agents):
            dl.agent(f"bench{layout[0]}{i}", swarm=f"s{layout[0]}{i % 8}", domain=f"d{layout[0]}{i % 2}")
        names = [f"bench{layout[0]}{i}" for i in range(agents)]
        cache = type(dl.wavegen.cache)(dl.config.wavegen)
        g = torch.Generator().manual_seed(0)
        keys = []
        for tier, n in sizes.items():
            for j in range(n):
                agent = names[j % agents]
                info = dl.hierarchy.agent(agent)
                ids = [7, j, hash(tier) % 1000]
                prov = provenance(dl.snapshot(agent), tier, sampling)
                e = CacheEntry(
                    tier,
                    prompt_key(ids),
                    prov,
                    ids,
                    [1, 2, 3],
                    "x",
                    agent,
                    info.swarm,
                    info.domain,
                    sampling,
                    "r",
                    1.0,
                    vector=torch.randn(dim, generator=g),
                )
                cache.store(e)
                keys.append((agent, ids, e.vector))
        rng = random.Random(0)
        exact, semantic, misses = [], [], []
        for _ in range(500 if quick else 3000):
            agent, ids, vector = rng.choice(keys)
            t = time.perf_counter()
            snap = dl.snapshot(agent)
            provs = {tier: provenance(snap, tier, sampling) for tier in CACHE_TIERS}
            found = cache.lookup(prompt_key(ids), provs)
            exact.append(time.perf_counter() - t)
            assert found is not None
            t = time.perf_counter()
            cache.lookup(prompt_key(ids + [0]), provs)
            misses.append(time.perf_counter() - t)
            query = vector + 0.1 * torch.randn(dim, generator=g)
            t = time.perf_counter()
            cache.lookup_semantic(query, provs, 0.9)
            semantic.append(time.perf_counter() - t)
        rows.append(
            {
                "layout": layout,
                "entries": len(cache.entries()),
                "exact_hit_p50_ms": statistics.median(exact) * 1e3,
                "exact_hit_p99_ms": percentile(exact, 0.99) * 1e3,
                "exact_miss_p50_ms": statistics.median(misses) * 1e3,
                "semantic_p50_ms": statistics.median(semantic) * 1e3,
                "semantic_p99_ms": percentile(semantic, 0.99) * 1e3,
                "semantic_dim": dim,
            }
        )
    return rows


def serving(dl: DynamicLoRA, quick: bool) -> dict:
    """Generating 64 tokens against serving them from the cache: jump, and verify with every draft token accepted."""
    agent = dl.agent("server", swarm="serve", domain="bench")
    prompt = SNIPPETS[0]
    gen = {"max_new_tokens": 64, "stop_at_eos": False}
    agent.generate(prompt, **gen)  # store the entry
    res = time_interleaved(
        {
            "generate 64 tokens (no cache)": lambda: agent.generate(prompt, use_cache=False, **gen),
            "verify hit (all accepted)": lambda: agent.generate(prompt, mode="verify", **gen),
            "jump hit": lambda: agent.generate(prompt, mode="jump", **gen),
        },
        repeats=5 if quick else 15,
    )
    hit = agent.generate(prompt, mode="verify", **gen)
    base = res["generate 64 tokens (no cache)"]["median_s"]
    return {
        "timings": res,
        "accepted": f"{hit.accepted_tokens}/{hit.draft_tokens}",
        "verify_speedup": base / res["verify hit (all accepted)"]["median_s"],
        "jump_speedup": base / res["jump hit"]["median_s"],
    }


def zipf_workload(quick: bool, learn_every: int) -> dict:
    """8 agents in 2 swarms draw prompts by Zipf(1.1) from 16 snippets; every ``learn_every`` requests (0: never)
    one agent learns (its context tier changes, so verified drafts may be cut); ticks every 100 requests
    consolidate hot entries. The same request sequence runs twice on fresh instances, through the cache and
    without it."""
    requests = 200 if quick else 600
    weights = [1 / (k + 1) ** 1.1 for k in range(len(SNIPPETS))]
    runs = {}
    for use_cache in (True, False):
        dl = build(quick)
        agents = [dl.agent(f"z{i}", swarm=f"team{i % 2}", domain="python") for i in range(8)]
        rng = random.Random(0)
        served, timeline, times, hits = {}, [], [], 0
        for n in range(1, requests + 1):
            agent = rng.choice(agents)
            prompt = rng.choices(SNIPPETS, weights)[0]
            t = time.perf_counter()
            r = agent.generate(prompt, max_new_tokens=32, use_cache=use_cache)
            times.append(time.perf_counter() - t)  # includes the ticks (and consolidations) that fall due
            served[r.cache] = served.get(r.cache, 0) + 1
            hits += r.cache not in ("miss", "off")
            timeline.append(hits / n)
            if learn_every and n % learn_every == 0:
                agent.learn(prompt, "\n    return None\n")
        runs[use_cache] = (dl, served, timeline, times)
    dl, served, timeline, times = runs[True]
    stats = dl.cache_statistics()
    plain = runs[False][3]
    return {
        "learn_every": learn_every,
        "requests": requests,
        "served": served,
        "hit_rate": stats["hit_rate"],
        "acceptance_rate": stats["acceptance_rate"],
        "per_tier": {
            t: {k: v[k] for k in ("hits", "semantic_hits", "stores", "invalidated", "consolidated")}
            for t, v in stats["tiers"].items()
        },
        "consolidations": stats["consolidations"],
        "total_s": sum(times),
        "total_uncached_s": sum(plain),
        "median_request_s": statistics.median(times),
        "median_uncached_request_s": statistics.median(plain),
        "timeline": timeline,
    }


def personal_workload(quick: bool, strength_step: float) -> dict:
    """Agent-tier entries and idle circuits: 8 agents each ask their own 4 prompts (Zipf), and each agent's own
    tier holds an ungated circuit that nothing rehearses (a gated one would act whole until forgotten, see
    dynamics.memory), which decays at every tick (every 50 requests). An agent-tier entry is keyed by its agent's
    tier content, so it lives until that circuit's content changes: with ``strength_step`` 0.7 (the default) at
    the few ticks that cross a step, with 0.999 (nearly continuous decay, what every tick did before) at every
    tick."""
    requests = 200 if quick else 400
    config = DynamicLoRAConfig(
        wavegen={"min_coherence": 0.0}, dynamics={"tick_interval": 50, "strength_step": strength_step}
    )
    dl = model_under_test(quick, config)
    g = torch.Generator().manual_seed(0)
    agents = [dl.agent(f"p{i}", swarm=f"team{i % 2}", domain="python") for i in range(8)]
    for agent in agents:
        idle = Circuit(
            factors={
                n: (
                    torch.randn(2, m.in_features, generator=g) * 0.05,
                    torch.randn(m.out_features, 2, generator=g) * 0.05,
                )
                for n, m in dl.layers.items()
            },
            tier="",
            scope="",
        )
        dl.add_circuit(f"agent:{agent.id}", idle, pinned=False)
    rng = random.Random(1)
    weights = [1 / (k + 1) ** 1.1 for k in range(4)]
    served: dict[str, int] = {}
    for _ in range(requests):
        agent = rng.choice(agents)
        prompt = f"# {agent.id}\n" + rng.choices(SNIPPETS[:4], weights)[0]
        r = agent.generate(prompt, max_new_tokens=16)
        served[r.cache] = served.get(r.cache, 0) + 1
    stats = dl.cache_statistics()["tiers"]["agent"]
    return {
        "strength_step": strength_step,
        "requests": requests,
        "served": served,
        "agent_tier_hit_rate": stats["hits"] / requests,
        "agent_tier": {k: stats[k] for k in ("hits", "stores", "invalidated")},
        "ticks": dl.tick_count,
    }


def plot(out_dir: Path, name: str, serve: dict, workloads: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(serve["timings"])
    ax1.bar(range(len(labels)), [serve["timings"][k]["median_s"] * 1e3 for k in labels], color=["grey", "C0", "C2"])
    ax1.set_xticks(range(len(labels)), [k.replace(" (", "\n(") for k in labels], fontsize=8)
    ax1.set_ylabel("median ms (64 tokens)")
    ax1.set_yscale("log")
    ax1.set_title("serving a hit vs generating")
    for w in workloads:
        label = f"learning every {w['learn_every']}" if w["learn_every"] else "no learning"
        ax2.plot(range(1, len(w["timeline"]) + 1), w["timeline"], label=label)
    ax2.legend()
    ax2.set_xlabel("request")
    ax2.set_ylabel("cumulative hit rate")
    ax2.set_ylim(0, 1)
    ax2.set_title("Zipf workload, 8 agents in 2 swarms")
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__, argv)
    dl = build(args.quick)
    lookups = lookup_latency(dl, args.quick)
    serve = serving(dl, args.quick)
    workloads = [zipf_workload(args.quick, 0), zipf_workload(args.quick, 25)]
    personal = [personal_workload(args.quick, step) for step in (0.7, 0.999)]
    model = "tiny random llama" if args.quick else model_label()
    checks = {}
    for r in lookups:
        checks[f"{r['layout']}: exact lookup p50 <= 1 ms at {r['entries']} entries"] = r["exact_hit_p50_ms"] <= 1.0
        checks[f"{r['layout']}: semantic lookup p50 <= 5 ms at {r['entries']} entries"] = r["semantic_p50_ms"] <= 5.0
    checks["jump hit >= 50x faster than generating 64 tokens"] = serve["jump_speedup"] >= 50
    checks["fully accepted verify hit >= 3x faster"] = serve["verify_speedup"] >= 3
    md = [
        f"# WaveGen ({model}, cpu)",
        "",
        "## Lookup latency (the whole lookup path: snapshot, provenance of 4 tiers, prompt key, lookup)",
        "",
        "| layout | entries | exact hit p50 | exact hit p99 | exact miss p50 | semantic p50 | semantic p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['layout']} | {r['entries']} | {r['exact_hit_p50_ms']:.3f} ms | {r['exact_hit_p99_ms']:.3f} ms | "
        f"{r['exact_miss_p50_ms']:.3f} ms | {r['semantic_p50_ms']:.3f} ms | {r['semantic_p99_ms']:.3f} ms |"
        for r in lookups
    ]
    md += [
        "",
        f"Semantic vectors have {lookups[0]['semantic_dim']} dimensions; the search covers the entries of equal "
        "provenance in every tier. Computing a prompt's vector is part of its prefill (reported with serving).",
        "",
        "## Serving a hit against generating 64 tokens (medians, interleaved)",
        "",
        "| path | median | speed-up |",
        "|---|---|---|",
    ]
    base = serve["timings"]["generate 64 tokens (no cache)"]["median_s"]
    md += [
        f"| {k} | {v['median_s'] * 1e3:.2f} ms | {base / v['median_s']:.1f}× |" for k, v in serve["timings"].items()
    ]
    for w in workloads:
        learning = f"one agent learns every {w['learn_every']} requests" if w["learn_every"] else "no learning"
        md += [
            "",
            f"## Zipf workload: {w['requests']} requests, 8 agents in 2 swarms, 16 prompts, {learning}",
            "",
            f"- served: {w['served']}",
            f"- hit rate {w['hit_rate']:.3f}; draft acceptance {w['acceptance_rate'] or 0:.3f}",
            f"- consolidations: {w['consolidations']}",
            f"- the whole workload: {w['total_s']:.1f} s through the cache, {w['total_uncached_s']:.1f} s without "
            f"({w['total_uncached_s'] / w['total_s']:.2f}× speed-up; consolidation ticks included); median request "
            f"{w['median_request_s'] * 1e3:.1f} ms vs {w['median_uncached_request_s'] * 1e3:.1f} ms",
            "",
            "| tier | hits | semantic hits | stores | invalidated | consolidated |",
            "|---|---|---|---|---|---|",
        ]
        md += [
            f"| {t} | {v['hits']} | {v['semantic_hits']} | {v['stores']} | {v['invalidated']} | {v['consolidated']} |"
            for t, v in w["per_tier"].items()
        ]
    md += [
        "",
        f"## Agent-tier entries under idle decay: {personal[0]['requests']} requests, 8 agents with 4 prompts of "
        "their own, one idle circuit in each agent's tier, a tick every 50 requests",
        "",
        "| decay | agent-tier hit rate | hits | stores | invalidated |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {'in steps of 0.7 (default)' if p['strength_step'] < 0.9 else 'nearly continuous (step 0.999)'} | "
        f"{p['agent_tier_hit_rate']:.3f} | {p['agent_tier']['hits']} | {p['agent_tier']['stores']} | "
        f"{p['agent_tier']['invalidated']} |"
        for p in personal
    ]
    md += ["", "## Targets", ""] + [f"- {'met' if ok else '**missed**'}: {k}" for k, ok in checks.items()]
    name = "wavegen-cpu" + ("-quick" if args.quick else model_suffix())
    out = Path(args.out)
    png = plot(out, name, serve, workloads)
    md += ["", f"![serving and hit rate]({png.name})"]
    write(
        out,
        name,
        {
            "model": model,
            "lookups": lookups,
            "serving": serve,
            "zipf": workloads,
            "personal": personal,
            "targets": checks,
        },
        "\n".join(md) + "\n",
    )
    print("\n".join(md))
    return checks


if __name__ == "__main__":
    main()
