"""Serving under load: 16 concurrent clients, each its own agent with its own key, for a fixed time, against
the server with batching and with batching off. Throughput, p50/p99 latency, failed requests, and the server
process's memory over the run (it must stay flat).

Both modes run with WaveGen off (``--no-cache``), so that a request costs the same decoding either way; with the
cache on, a request that arrives alone would be served through it and the comparison would measure the cache.

Run: ``python benchmarks/server.py`` (60 s per mode on the default model; ``--quick``: tiny model, 5 s).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from ..server.launch import free_port, spawn
from .record import arguments, model_label, model_path, model_suffix, write

ADMIN = "bench-admin"
CLIENTS = 16
MAX_TOKENS = 16
# learned completions longer than MAX_TOKENS, so every request decodes MAX_TOKENS tokens whether the agent's
# circuit is applied or has faded (the base model does not stop early here either): equal work per request
PROMPT = "def handle(request):"
LONG = " return dispatch_{i}(request, settings=load_settings(), retries=3, timeout=30.0, log=logger)"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(state: Path, model: Path, port: int, batching: bool) -> subprocess.Popen:
    options = ["--max-queue", "256", "--no-cache"] + ([] if batching else ["--no-batching"])
    return spawn(state, model, port, ADMIN, *options)


async def _load(url: str, keys: dict[str, str], seconds: float, pid: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0
    memory: list[tuple[float, float]] = []
    start = time.monotonic()
    end = start + seconds

    async def client(agent: str, key: str) -> None:
        nonlocal tokens
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while time.monotonic() < end:
                # the prompt each agent learned: its gated circuit acts on every row (a heterogeneous batch)
                body = {"model": agent, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/completions", json=body, headers=headers)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                        tokens += r.json()["usage"]["completion_tokens"]
                    else:
                        failures.append(f"{r.status_code}: {r.text[:100]}")
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    async def sample() -> None:
        while time.monotonic() < end:
            memory.append((time.monotonic() - start, _rss_mib(pid)))
            await asyncio.sleep(1.0)

    await asyncio.gather(sample(), *(client(a, k) for a, k in keys.items()))
    elapsed = time.monotonic() - start
    ordered = sorted(latencies)
    half = [m for t, m in memory if t >= seconds / 2] or [m for _, m in memory]
    return {
        "seconds": elapsed,
        "requests": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "throughput_rps": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_s": statistics.median(ordered) if ordered else None,
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
        "rss_mib": memory,
        "rss_first_half_max_mib": max((m for t, m in memory if t < seconds / 2), default=None),
        "rss_second_half_max_mib": max(half),
    }


def run_mode(model: Path, batching: bool, seconds: float, port: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = _start(Path(tmp) / "state", model, port, batching)
        url = f"http://127.0.0.1:{port}"
        try:
            keys = {}
            with httpx.Client(base_url=url, timeout=120) as http:
                admin = {"Authorization": f"Bearer {ADMIN}"}
                for i in range(CLIENTS):
                    agent = f"agent{i:02d}"
                    r = http.post(
                        "/v1/agents", json={"id": agent, "swarm": f"team{i % 4}", "domain": "python"}, headers=admin
                    )
                    keys[agent] = r.json()["api_key"]
                    http.post(
                        "/v1/learn",
                        json={"model": agent, "prompt": PROMPT, "completion": LONG.format(i=i)},
                        headers={"Authorization": f"Bearer {keys[agent]}"},
                    )
            result = asyncio.run(_load(url, keys, seconds, proc.pid))
            result["engine"] = httpx.get(f"{url}/health").json()["engine"]
        finally:
            proc.kill()
            proc.wait()
    return {"batching": batching, **result}


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = ["batched" if r["batching"] else "unbatched" for r in runs]
    a.bar([f"{n}\np50" for n in names], [r["p50_s"] * 1e3 for r in runs], color="#1f77b4")
    a.bar([f"{n}\np99" for n in names], [r["p99_s"] * 1e3 for r in runs], color="#ff7f0e")
    a.set_ylabel("latency (ms)")
    a.set_title(f"{CLIENTS} clients · " + " vs ".join(f"{r['throughput_rps']:.1f} req/s" for r in runs))
    for n, r in zip(names, runs):
        b.plot([t for t, _ in r["rss_mib"]], [m for _, m in r["rss_mib"]], label=n)
    b.set_xlabel("seconds")
    b.set_ylabel("server RSS (MiB)")
    b.set_title("server memory over the run")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__, argv)
    from ..testing import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model, label, seconds = save_tiny_model(Path(tmp) / "tiny"), "tiny-3.4M", 5.0
        else:
            model, label, seconds = model_path(), model_label(), 60.0
        runs = [run_mode(Path(model), batching, seconds, free_port()) for batching in (True, False)]
    batched, unbatched = runs
    speedup = batched["throughput_rps"] / unbatched["throughput_rps"] if unbatched["throughput_rps"] else None
    growth = [r["rss_second_half_max_mib"] - r["rss_first_half_max_mib"] for r in runs]
    checks = {
        "zero failed requests": all(r["failed"] == 0 for r in runs),
        "memory flat (second half's peak within 5% of the first half's)": all(
            g <= 0.05 * r["rss_first_half_max_mib"] for g, r in zip(growth, runs)
        ),
    }
    md = [
        f"# Serving: {CLIENTS} concurrent clients, one agent each ({label}, cpu, {seconds:.0f} s per mode)",
        "",
        "| mode | requests | failed | throughput | tokens/s | p50 | p99 | batches / rows | RSS, 1st → 2nd half |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, g in zip(runs, growth):
        md.append(
            f"| {'batched' if r['batching'] else 'unbatched'} | {r['requests']} | {r['failed']} | "
            f"{r['throughput_rps']:.2f} req/s | {r['tokens_per_s']:.1f} | {r['p50_s'] * 1e3:.0f} ms | "
            f"{r['p99_s'] * 1e3:.0f} ms | {r['engine']['batches']} / {r['engine']['rows']} | "
            f"{r['rss_first_half_max_mib']:.0f} → {r['rss_second_half_max_mib']:.0f} MiB ({g:+.1f}) |"
        )
    md += ["", f"batched / unbatched throughput: {speedup:.2f}×" if speedup else ""]
    md += ["", "## Targets", ""] + [f"- {'met' if ok else '**missed**'}: {k}" for k, ok in checks.items()]
    name = "server-cpu" + ("-quick" if args.quick else model_suffix())
    out = Path(args.out)
    write(
        out,
        name,
        {
            "model": label,
            "clients": CLIENTS,
            "max_tokens": MAX_TOKENS,
            "runs": runs,
            "speedup": speedup,
            "targets": checks,
        },
        "\n".join(md) + "\n",
    )
    _plot(runs, out / f"{name}.png")
    print("\n".join(md))
    return checks


if __name__ == "__main__":
    main()
