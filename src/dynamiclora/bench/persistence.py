"""Persistence benchmark: what a durable learn's save costs as the cache fills and the agents multiply.

The server saves after every learn. A save writes what changed since the last save to the same directory (see
store.Writer), so its cost should follow the learn, not the size of what is already saved: measured with 0, 5,000,
20,000 and 36,000 cache entries (the cache's capacity) and with 1,000 agents, against the same save written in
full (every row and file again, as every save was before). Each case: a learn, then a save, repeated; the median
of the saves.

Run: ``python benchmarks/persistence.py`` (``--quick``: tiny random model, fewer repeats and entries).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import CACHE_TIERS, DynamicLoRAConfig
from ..core import DynamicLoRA
from ..store import Writer
from ..wavegen import CacheEntry
from ..wavegen.signature import prompt_key
from .record import arguments, model_label, model_suffix, model_under_test, write

TARGET = 1.5  # a save at any size within this factor of the empty case


def fill_cache(dl: DynamicLoRA, n: int, seed: int = 0) -> None:
    """``n`` entries with semantic vectors, as many distinct prompts would leave them: the slow tiers fill first
    (36,000 fills every tier to its default size)."""
    g = torch.Generator().manual_seed(seed)
    dim = dl.model.config.hidden_size
    agents = dl.agents
    cache = dl.wavegen.cache
    tiers = [t for t, size in zip(CACHE_TIERS, dl.config.wavegen.max_sizes) for _ in range(size)]
    for i in range(n):
        agent = dl.hierarchy.agent(agents[i % len(agents)])
        tier = tiers[i] if i < len(tiers) else "agent"
        ids = [1 + i % 400, 1 + i // 400 % 400, 1 + i // 160_000] + [1 + (i * 7919 + k) % 400 for k in range(9)]
        key = prompt_key(ids)
        cache.record_request(key, agent)
        vector = torch.randn(dim, generator=g)
        entry = CacheEntry(tier, key, f"prov-{tier}-{agent.id}", ids, ids[:8], "text", agent.id, agent.swarm,
                           agent.domain, "greedy", "r", 1.0, vector=vector / vector.norm())  # fmt: skip
        cache.store(entry)


def save_cost(dl: DynamicLoRA, directory: Path, repeats: int, full: bool) -> dict:
    """Median time of ``dl.save`` right after a learn (incremental, or ``full``: a fresh writer every time)."""
    agent = dl.agent(dl.agents[0])
    dl.save(directory)  # the first save of a directory is always full
    times = []
    for i in range(repeats):
        agent.learn(f"def fact_{i % 3}():", f" return {i}")
        if full:
            dl.writer = Writer()
        t = time.perf_counter()
        dl.save(directory)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeats}


def case(quick: bool, entries: int, agents: int, repeats: int) -> dict:
    config = DynamicLoRAConfig(dynamics={"tick_interval": 0})
    dl = model_under_test(quick, config)
    for i in range(agents):
        dl.agent(f"a{i}", swarm=f"s{i % 10}", domain=f"d{i % 2}")
    fill_cache(dl, entries)
    out = {"entries": len(dl.wavegen.cache.entries()), "agents": agents}
    for mode in ("incremental", "full"):
        directory = Path(tempfile.mkdtemp(prefix="dl-save-"))
        try:
            out[mode] = save_cost(dl, directory, repeats, full=mode == "full")
            out[f"{mode}_db_bytes"] = (directory / "state.sqlite").stat().st_size
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return out


def plot(out_dir: Path, name: str, cases: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{c['entries']:,} entries\n{c['agents']} agents" for c in cases]
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], [c["incremental"]["median_s"] * 1e3 for c in cases], 0.4, label="incremental")
    ax.bar([i + 0.2 for i in x], [c["full"]["median_s"] * 1e3 for c in cases], 0.4, label="full rewrite")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("save after a learn (ms, median)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Durable learn: cost of the save")
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__, argv)
    out_dir = Path(args.out)
    name = "persistence-quick" if args.quick else "persistence-cpu" + model_suffix()
    repeats = 5 if args.quick else 15
    sizes = (
        [(0, 4), (1_000, 4), (5_000, 4)] if args.quick else [(0, 4), (5_000, 4), (20_000, 4), (36_000, 4), (0, 1000)]
    )
    started = time.perf_counter()
    cases = [case(args.quick, n, agents, repeats) for n, agents in sizes]
    empty = cases[0]["incremental"]["median_s"]
    worst = max(c["incremental"]["median_s"] for c in cases)
    checks = {"every save within 1.5x of the empty case": worst <= TARGET * empty}
    model = "tiny random llama" if args.quick else model_label()
    lines = [
        f"# Persistence ({model}, cpu)",
        "",
        "A learn, then `dl.save` to the same directory, repeated; the save's median. *Full* gives the writer no "
        "memory of the directory, so every save rewrites every row and file (what every save did before saves "
        "became incremental).",
        "",
        "| target | met |",
        "|---|---|",
        *(f"| {k} (worst {worst / empty:.2f}x) | {'met' if v else '**no**'} |" for k, v in checks.items()),
        "",
        "| cache entries | agents | incremental save | full rewrite | full / incremental | database |",
        "|---|---|---|---|---|---|",
    ]
    for c in cases:
        inc, full = c["incremental"]["median_s"], c["full"]["median_s"]
        lines.append(
            f"| {c['entries']:,} | {c['agents']:,} | {inc * 1e3:.1f} ms ({inc / empty:.2f}x) | {full * 1e3:.1f} ms "
            f"| {full / inc:.1f}x | {c['incremental_db_bytes'] / 1e6:.1f} MB |"
        )
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s."]
    record = {"model": model, "cases": cases, "targets": checks, "repeats": repeats}
    js, md = write(out_dir, name, record, "\n".join(lines) + "\n")
    plot(out_dir, name, cases)
    print(md.read_text())
    return record
