"""The stdlib model: a small Llama-style LM (4.3M parameters) pretrained on the Python standard library's source.

It was the project's first default model; SmolLM2-135M-Instruct (``smollm2``) has taken that place. It stays
as a named alternative (``--model stdlib`` in the benchmarks) because it is a real trained model that needs
nothing but Python, and it is fast: figures on it run in minutes and compare with earlier ones. Its corpus
and tokenizer trainer also build the tokenizers of the tests' tiny models (``testing``). The build
is deterministic from a seed (for a given Python version and torch build): files in sorted order, a
byte-level BPE tokenizer trained with ``tokenizers``, a fixed training schedule. The result is saved
in the Hugging Face format under a data directory and loaded through the ordinary
``from_pretrained`` path, like any hub model. One file in twenty is held out of training so that later
benchmarks can measure perplexity on source the model never saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import home_dir

EOS = "<|endoftext|>"
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "pydoc_data",
    "encodings",
    "dist-packages",
}


@dataclass(frozen=True)
class StdlibModelSpec:
    """Everything that determines the built-in model; its hash names the cache directory."""

    version: int = 2
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    tokenizer_corpus_bytes: int = 4_000_000
    max_train_files: int | None = None  # None: the whole training part of the standard library
    seed: int = 0
    bf16: bool = field(default_factory=lambda: _fast_bf16())  # autocast where the CPU has native bf16

    def digest(self) -> str:
        payload = json.dumps({**asdict(self), "python": sys.version_info[:2]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where autocast trains ~2.5x faster."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))
    train, held_out = [], []
    for p in files:
        key = int(hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest(), 16)
        (held_out if key % 20 == 0 else train).append(p)
    return train, held_out


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a Transformers fast tokenizer, EOS doubling as BOS and pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS, model_max_length=1 << 30
    )


def llama_config(spec: StdlibModelSpec, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )  # no pad id: see testing.tiny_config


def ensure_stdlib_model(
    data_dir: str | Path | None = None, spec: StdlibModelSpec | None = None, progress: bool = True
) -> Path:
    """Path of the built-in model in Hugging Face format, pretraining it first if it is not cached."""
    spec = spec or StdlibModelSpec()
    target = Path(data_dir or home_dir()) / f"stdlib-model-{spec.digest()}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    build_stdlib_model(target, spec, progress=progress)
    return target


def build_stdlib_model(target: Path, spec: StdlibModelSpec, progress: bool = True) -> Path:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoModelForCausalLM

    started = time.time()
    torch.manual_seed(spec.seed)
    train_files, held_out = stdlib_files()
    if not train_files:
        raise RuntimeError(f"found no Python sources under {sysconfig.get_paths()['stdlib']!r} to pretrain on")
    texts = read_texts(train_files[: spec.max_train_files])
    tok_texts, size = [], 0
    for t in texts:  # the tokenizer sees a deterministic prefix of the corpus
        if size >= spec.tokenizer_corpus_bytes:
            break
        tok_texts.append(t)
        size += len(t)
    tokenizer = train_tokenizer(tok_texts, spec.vocab_size)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    data = torch.tensor(ids, dtype=torch.long)

    model = AutoModelForCausalLM.from_config(llama_config(spec, eos))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec.seed)

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.learning_rate * (step + 1) / spec.warmup_steps
        frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    losses = []
    columns = [
        TextColumn("[bold]pretraining the built-in model"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=spec.steps, info="")
        for step in range(spec.steps):
            starts = torch.randint(0, len(data) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
            batch = torch.stack([data[s : s + spec.seq_len] for s in starts.tolist()])
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
                loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, info=f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")

    model.eval()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "spec": asdict(spec),
        "python": sys.version,
        "torch": torch.__version__,
        "train_files": len(train_files),
        "held_out_files": len(held_out),
        "train_tokens": len(data),
        "final_loss": losses[-1],
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "build_seconds": time.time() - started,
    }
    (tmp / "dynamiclora_stdlib.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic publish: a crash mid-build leaves no half model behind
    return target


def held_out_texts() -> list[str]:
    """Standard-library source the built-in model never trained on (for perplexity measurements)."""
    return read_texts(stdlib_files()[1])
