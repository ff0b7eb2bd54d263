"""Serving under load: 64 concurrent clients, each its own agent with its own key, streaming completions of mixed
lengths (prompts of 8 to 200 tokens, ``max_tokens`` from 8 to 256) while one request in ten is a learn, for a
fixed time per mode:

* continuous — the default engine: rows join the running decode between steps and leave as they finish;
* static — requests waiting together run as one batch to its end (the engine before continuous batching);
* off — one request at a time;
* continuous, no learning — the same load without the learns (generation latency with and without them).

Measured per mode: tokens per second, time to first token (the first streamed piece) p50 / p99, inter-token
latency p50 / p99 (the gaps between streamed pieces, per token), request latency, failed requests, the server
process's memory over the run (it must stay flat). Every mode runs with WaveGen off (``--no-cache``), so that a
request costs the same decoding in every mode. After the continuous run the same load goes on for 20 s and the
server is killed with SIGKILL in the middle of it, then restarted on its state: every learn it acknowledged
(in either phase) must be there.

Run: ``python benchmarks/server.py`` (300 s per mode on the default model; ``--quick``: tiny model, 4 s;
``--seconds N`` to change it).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from ..server.launch import free_port, spawn
from .record import add_model_argument, model_label, model_path, model_suffix, select_model, write

ADMIN = "bench-admin"
CLIENTS = 64
LEARN_EVERY = 10  # one request in ten is a learn
MODES = (("continuous", True), ("static", True), ("off", True), ("continuous", False))
WORDS = "request handler settings timeout retry logger payload schema cursor buffer token stream".split()


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


SIZES = {
    "real": (120, 256),
    "quick": (12, 48),
}  # most words of context, most max_tokens (the tiny model: 256 positions)


def workload(rng: random.Random, client: int, size: str) -> tuple[str, int]:
    """A prompt of a few words to ``SIZES[size][0]`` words of context (about 8 to 200 tokens on the default model)
    and a max_tokens from 8 to ``SIZES[size][1]``, both log-uniform."""
    most_words, most_tokens = SIZES[size]
    words = int(math.exp(rng.uniform(math.log(4), math.log(most_words))))
    context = " ".join(rng.choice(WORDS) for _ in range(words))
    max_tokens = int(math.exp(rng.uniform(math.log(8), math.log(most_tokens))))
    return f"# {context}\ndef handle_{client}(request):", max_tokens


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(
    url: str,
    keys: dict[str, str],
    seconds: float,
    proc: subprocess.Popen,
    learning: bool,
    seed: int,
    size: str,
    kill: bool = False,
) -> dict:
    """``seconds`` of load; with ``kill``, the server gets SIGKILL at the end while every client is mid-request."""
    pid = proc.pid
    ttft: list[float] = []
    itl: list[float] = []
    latencies: list[float] = []
    failures: list[str] = []
    acknowledged: list[tuple[str, str]] = []  # (agent, circuit) of every learn the server answered
    tokens = learns = 0
    memory: list[tuple[float, float]] = []
    start = time.monotonic()
    end = start + seconds

    async def client(index: int, agent: str, key: str) -> None:
        nonlocal tokens, learns
        rng = random.Random(seed * 1000 + index)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, timeout=900) as http:
            n = 0
            while time.monotonic() < end:
                n += 1
                try:
                    if learning and n % LEARN_EVERY == index % LEARN_EVERY:
                        fact = f" return {rng.randint(0, 10**6)}"
                        body = {"model": agent, "prompt": f"def fact_{index}_{n}():", "completion": fact}
                        r = await http.post("/v1/learn", json=body, headers=headers)
                        if r.status_code == 200:
                            learns += 1
                            acknowledged.append((agent, r.json()["circuit"]))
                        else:
                            failures.append(f"learn {r.status_code}: {r.text[:100]}")
                        continue
                    prompt, max_tokens = workload(rng, index, size)
                    body = {"model": agent, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
                    body["stream_options"] = {"include_usage": True}
                    t0 = time.perf_counter()
                    first = last = None
                    pieces = 0
                    usage = None
                    async with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}: {(await r.aread())[:100]!r}")
                            continue
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                failures.append(str(event["error"])[:100])
                                break
                            now = time.perf_counter()
                            if event["choices"][0]["text"]:
                                pieces += 1
                                first = first if first is not None else now
                                last = now
                            usage = event.get("usage") or usage
                    if usage is None or first is None:
                        continue
                    done = time.perf_counter()
                    latencies.append(done - t0)
                    ttft.append(first - t0)
                    count = usage["completion_tokens"]
                    tokens += count
                    if count > 1 and last > first:
                        itl.append((last - first) / (count - 1))
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    async def sample() -> None:
        while time.monotonic() < end:
            memory.append((time.monotonic() - start, _rss_mib(pid)))
            await asyncio.sleep(min(1.0, max(end - time.monotonic(), 0.01)))
        if kill:
            proc.send_signal(signal.SIGKILL)

    await asyncio.gather(sample(), *(client(i, a, k) for i, (a, k) in enumerate(keys.items())))
    elapsed = time.monotonic() - start
    half = [m for t, m in memory if t >= seconds / 2] or [m for _, m in memory]
    return {
        "seconds": elapsed,
        "requests": len(latencies),
        "learns": learns,
        "acknowledged": acknowledged,
        "failed": len(failures),
        "failures": failures[:5],
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": percentile(latencies, 0.99),
        "rss_mib": memory,
        "rss_first_half_max_mib": max((m for t, m in memory if t < seconds / 2), default=None),
        "rss_second_half_max_mib": max(half),
    }


def _register(url: str) -> dict[str, str]:
    keys = {}
    with httpx.Client(base_url=url, timeout=300) as http:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for i in range(CLIENTS):
            agent = f"agent{i:02d}"
            body = {"id": agent, "swarm": f"team{i % 8}", "domain": "python"}
            keys[agent] = http.post("/v1/agents", json=body, headers=admin).json()["api_key"]
    return keys


def _durable(url: str, acknowledged: list[tuple[str, str]]) -> dict:
    """After a restart: is every acknowledged learn's circuit still there (in a tier, or recorded as migrated)?"""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, timeout=300) as http:
        held = {c["id"] for c in http.get("/v1/circuits", headers=admin).json()["data"]}
        moved = {m["circuit"] for m in http.get("/v1/migrations", headers=admin).json()["data"]}
    missing = [c for _, c in acknowledged if c not in held | moved]
    return {"acknowledged_learns": len(acknowledged), "missing_after_restart": len(missing)}


def run_mode(model: Path, batching: str, learning: bool, seconds: float, seed: int, kill: bool, size: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        state, port = Path(tmp) / "state", free_port()
        proc = spawn(state, model, port, ADMIN, "--max-queue", "256", "--no-cache", "--batching", batching)
        url = f"http://127.0.0.1:{port}"
        try:
            keys = _register(url)
            result = asyncio.run(_load(url, keys, seconds, proc, learning, seed, size))
            result["engine"] = httpx.get(f"{url}/health", timeout=60).json()["batch"]
            if kill:  # more of the same load, SIGKILL in the middle of it, a restart on the same state
                killed = asyncio.run(_load(url, keys, min(20.0, seconds), proc, learning, seed + 1, size, kill=True))
                proc.wait()
                proc = spawn(state, model, port, ADMIN, "--no-cache", "--batching", batching)
                result["restart"] = _durable(url, result["acknowledged"] + killed["acknowledged"])
        finally:
            proc.kill()
            proc.wait()
    result.pop("acknowledged")
    return {"batching": batching, "learning": learning, **result}


def _name(r: dict) -> str:
    return r["batching"] + ("" if r["learning"] else ", no learning")


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    names = [_name(r) for r in runs]
    a.bar(names, [r["tokens_per_s"] for r in runs], color="#1f77b4")
    a.set_ylabel("tokens / s")
    a.set_title(f"{CLIENTS} clients, throughput")
    a.tick_params(axis="x", labelsize=7)
    xs = range(len(runs))
    b.bar([x - 0.2 for x in xs], [(r["ttft_p50_s"] or 0) for r in runs], 0.4, label="p50")
    b.bar([x + 0.2 for x in xs], [(r["ttft_p99_s"] or 0) for r in runs], 0.4, label="p99")
    b.set_xticks(list(xs), names, fontsize=7)
    b.set_yscale("log")
    b.set_ylabel("seconds")
    b.set_title("time to first token")
    b.legend(fontsize=7)
    for n, r in zip(names, runs):
        c.plot([t for t, _ in r["rss_mib"]], [m for _, m in r["rss_mib"]], label=n)
    c.set_xlabel("seconds")
    c.set_ylabel("server RSS (MiB)")
    c.set_title("server memory over the run")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:,.0f} ms"


def main(argv: list[str] | None = None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None, help="load per mode (default 300; quick: 4)")
    add_model_argument(parser)
    args = parser.parse_args(argv)
    select_model(args.model)
    from ..testing import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model, label = save_tiny_model(Path(tmp) / "tiny"), "tiny-3.4M"
        else:
            model, label = model_path(), model_label()
        seconds = args.seconds or (4.0 if args.quick else 300.0)
        runs = [
            run_mode(
                Path(model), batching, learning, seconds, seed=1, kill=(i == 0), size="quick" if args.quick else "real"
            )
            for i, (batching, learning) in enumerate(MODES)
        ]
    by = {_name(r): r for r in runs}
    cont, static, off, quiet = by["continuous"], by["static"], by["off"], by["continuous, no learning"]
    growth = [r["rss_second_half_max_mib"] - r["rss_first_half_max_mib"] for r in runs]

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    figures = {
        "continuous / static tokens per second": ratio(cont["tokens_per_s"], static["tokens_per_s"]),
        "continuous / one at a time tokens per second": ratio(cont["tokens_per_s"], off["tokens_per_s"]),
        "continuous time to first token p99 / p50": ratio(cont["ttft_p99_s"], cont["ttft_p50_s"]),
        "continuous request latency p99, with learning / without": ratio(
            cont["latency_p99_s"], quiet["latency_p99_s"]
        ),
    }
    targets = {
        "continuous ≥ 1.5× static batching's tokens per second": (figures[next(iter(figures))] or 0) >= 1.5,
        "continuous ≥ 3× one at a time": (figures["continuous / one at a time tokens per second"] or 0) >= 3,
        "time to first token p99 ≤ 3× its p50": (figures["continuous time to first token p99 / p50"] or 1e9) <= 3,
        "generation p99 with learning within 2× of without": (
            figures["continuous request latency p99, with learning / without"] or 1e9
        )
        <= 2,
        "zero failed requests": all(r["failed"] == 0 for r in runs),
        "memory flat (second half's peak within 5% of the first half's)": all(
            g <= 0.05 * r["rss_first_half_max_mib"] for g, r in zip(growth, runs)
        ),
        "every acknowledged learn survives SIGKILL": cont["restart"]["missing_after_restart"] == 0,
    }
    md = [
        f"# Serving: {CLIENTS} concurrent clients of {CLIENTS} agents ({label}, cpu, {seconds:.0f} s per mode)",
        "",
        "Streaming completions, prompts of 8 to ~200 tokens and max_tokens of 8 to 256 (log-uniform); one request in "
        f"{LEARN_EVERY} a learn (except the last row). WaveGen off in every mode.",
        "",
        "| mode | requests | learns | failed | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | latency p50 | "
        "latency p99 | peak rows | RSS, 1st → 2nd half |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, g in zip(runs, growth):
        md.append(
            f"| {_name(r)} | {r['requests']} | {r['learns']} | {r['failed']} | {r['tokens_per_s']:.1f} | "
            f"{_ms(r['ttft_p50_s'])} | {_ms(r['ttft_p99_s'])} | {_ms(r['itl_p50_s'])} | {_ms(r['itl_p99_s'])} | "
            f"{_ms(r['latency_p50_s'])} | {_ms(r['latency_p99_s'])} | "
            f"{r['engine']['scheduler']['peak_rows'] if r['batching'] != 'static' else '–'} | "
            f"{r['rss_first_half_max_mib']:.0f} → {r['rss_second_half_max_mib']:.0f} MiB ({g:+.1f}) |"
        )
    restart = cont["restart"]
    md += [
        "",
        f"SIGKILL in the middle of 20 s more load after the continuous run, restart on its state: "
        f"{restart['acknowledged_learns']} acknowledged learns, {restart['missing_after_restart']} missing.",
        "",
        "## Figures",
        "",
    ]
    md += [f"- {k}: {'–' if v is None else f'{v:.2f}'}" for k, v in figures.items()]
    md += ["", "## Targets", ""] + [f"- {'met' if ok else '**missed**'}: {k}" for k, ok in targets.items()]
    name = "server-cpu" + ("-quick" if args.quick else model_suffix())
    out = Path(args.out)
    record = {
        "model": label,
        "clients": CLIENTS,
        "seconds": seconds,
        "runs": runs,
        "figures": figures,
        "targets": targets,
    }
    write(out, name, record, "\n".join(md) + "\n")
    _plot(runs, out / f"{name}.png")
    print("\n".join(md))
    return targets


if __name__ == "__main__":
    main()
