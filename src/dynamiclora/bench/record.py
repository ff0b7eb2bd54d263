"""A benchmark record: machine, versions, commit, parameters, results; written as JSON and markdown."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import DynamicLoRAConfig
from ..core import DynamicLoRA


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "dynamiclora"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    return out


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None
) -> dict[str, dict[str, float]]:
    """Median and spread of each function, measured round-robin so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
        for k, v in samples.items()
    }


def arguments(description: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The options every benchmark takes: ``--out`` (results directory) and ``--quick`` (tiny model, fewer repeats)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv)


def model_under_test(quick: bool, config: DynamicLoRAConfig, progress: bool = False) -> DynamicLoRA:
    """A tiny random Llama with ``--quick``, the built-in model otherwise."""
    if quick:
        from ..testing import tiny_model

        base, tokenizer = tiny_model("llama")
        return DynamicLoRA(base, tokenizer, config)
    return DynamicLoRA.default(config, progress=progress)


def write(out_dir: Path, name: str, record: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "machine": machine(),
        "versions": versions(),
        "commit": commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **record,
    }
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(record, indent=2, sort_keys=True))
    md.write_text(markdown)
    return js, md
