"""A benchmark record: machine, versions, commit, parameters, results; written as JSON and markdown."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import DynamicLoRAConfig
from ..core import DynamicLoRA
from ..packaged import DEFAULT_MODEL, PACKAGED, ensure_gguf, ensure_packaged


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


MODEL_HELP = (
    "the model to measure: 'smollm2' (the default model, SmolLM2-135M-Instruct from its package), 'gemma3-270m' "
    "(from its packages), 'stdlib' (the 4.3M model pretrained on the standard library), a .gguf file (converted "
    "once), or anything from_pretrained accepts (a directory or hub id)"
)
_selected = {"model": DEFAULT_MODEL}  # set once per benchmark run by add_model_argument / arguments


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)


def select_model(model: str) -> None:
    _selected["model"] = model


def selected_model() -> str:
    return _selected["model"]


def model_path(progress: bool = False) -> str:
    """The selected model as a directory or hub id (the packaged models are prepared once)."""
    model = _selected["model"]
    if model == "stdlib":
        from ..stdlib_model import ensure_stdlib_model

        return str(ensure_stdlib_model(progress=progress))
    if model in PACKAGED:
        return str(ensure_packaged(model, progress=progress))
    if model.endswith(".gguf"):
        return str(ensure_gguf(model, progress=progress))
    return model


def model_suffix() -> str:
    """What result names carry for a model other than the default one (``-stdlib``, ``-<dir name>``)."""
    model = _selected["model"]
    if model == DEFAULT_MODEL:
        return ""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(model).name.lower()).strip("-")
    return f"-{slug or 'model'}"


def model_label() -> str:
    model = _selected["model"]
    return "stdlib model (4.3M)" if model == "stdlib" else PACKAGED[model].name if model in PACKAGED else model


def arguments(description: str | None, argv: list[str] | None, extra=None) -> argparse.Namespace:
    """The options every benchmark takes: ``--out`` (results directory), ``--quick`` (tiny model, fewer repeats)
    and ``--model`` (what to measure when not quick); ``extra(parser)`` adds a benchmark's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    add_model_argument(parser)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    select_model(args.model)
    return args


def model_under_test(quick: bool, config: DynamicLoRAConfig, progress: bool = False) -> DynamicLoRA:
    """A tiny random Llama with ``--quick``, the selected model (``--model``; the default one by default)
    otherwise."""
    if quick:
        from ..testing import tiny_model

        base, tokenizer = tiny_model("llama")
        return DynamicLoRA(base, tokenizer, config)
    return DynamicLoRA.from_pretrained(model_path(progress), config)


def fresh_models(quick: bool) -> tuple[Callable[[], Any], Any]:
    """A function that loads a fresh copy of the model under test (a tiny random chat Llama with ``--quick``, the
    selected model otherwise), and its tokenizer: for benchmarks that give each method a model of its own."""
    if quick:
        from ..testing import tiny_chat_model

        return (lambda: tiny_chat_model("llama")[0]), tiny_chat_model("llama")[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(progress=True)
    return (lambda: AutoModelForCausalLM.from_pretrained(path).eval()), AutoTokenizer.from_pretrained(path)


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
