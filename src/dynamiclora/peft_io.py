"""PEFT interoperability: scopes and stacks out as standard LoRA adapters, adapters in as circuits.

Export concatenates the chosen circuits along the rank axis with each circuit's scale folded into B,
and writes ``lora_alpha = r`` so PEFT's scaling is 1: the adapter's delta on every module is exactly
``Σ s·B A``. Keys follow PEFT's saved layout, ``base_model.model.<module>.lora_A.weight`` (r × in) and
``.lora_B.weight`` (out × r). Import reads PEFT's scaling (``lora_alpha / r``, or ``/ √r`` with rsLoRA,
per-module rank and alpha patterns) and folds it into B.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .circuits import Circuit, concat_factors
from .errors import GateLostWarning, IncompatibleAdapterError, InvalidInputError, UnknownScopeError
from .hierarchy import Scope
from .store import atomic_write

if TYPE_CHECKING:
    from .stack import StackedLinear

PREFIX = "base_model.model."
KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


GATED_CHOICES = ("include", "exclude")
MANIFEST = "dynamiclora_export.json"  # beside the adapter: what the export kept and what it lost


def export_peft(
    scopes: list[Scope],
    what: str,
    layers: dict[str, StackedLinear],
    model_id: str,
    out_dir: Path,
    gated: str = "include",
) -> Path:
    """Write these scopes' circuits (``what`` names them in errors) as one PEFT LoRA adapter (ranks concatenated).

    A PEFT adapter cannot route. ``gated="include"``: gated circuits are written as always acting, so the adapter
    equals the memory only on inputs that reach every gated circuit, and adds them elsewhere too (a
    :class:`GateLostWarning` says so). ``gated="exclude"``: they are left out, so the adapter equals the memory on
    inputs that reach no gated circuit and lacks what they learned. Either way ``dynamiclora_export.json`` lists
    every circuit, whether it was written and whether its gate was lost.
    """
    if gated not in GATED_CHOICES:
        raise InvalidInputError(f"gated must be one of {GATED_CHOICES}, got {gated!r}")
    every = [c for s in scopes for c in s.circuits.values()]
    circuits = [c for c in every if gated == "include" or c.gate is None]
    if not circuits:
        left = f" ({len(every)} gated ones left out by gated='exclude')" if every else ""
        raise UnknownScopeError(f"{what} holds no circuits to export{left}: there is nothing to export")
    lost = [c for c in circuits if c.gate is not None]
    if lost:
        warnings.warn(
            f"{len(lost)} of the {len(circuits)} circuits exported from {what} are gated; a PEFT adapter cannot "
            "route, so they act on every input there (off their prompts the adapter differs from the memory). "
            "gated='exclude' leaves them out instead; dynamiclora_export.json lists them",
            GateLostWarning,
            stacklevel=3,
        )
    tensors, rank, conv1d = {}, 0, set()
    covered = {m for c in circuits for m in c.factors}  # modules no circuit covers are left out of the adapter
    for name, layer in layers.items():
        if name not in covered:
            continue
        a, b = concat_factors(circuits, name, layer.in_features, layer.out_features)
        rank = a.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        if layer.is_conv1d:
            conv1d.add(name)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model_id,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(covered),
        "bias": "none",
        "fan_in_fan_out": bool(conv1d),
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "revision": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(
        out_dir / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))
    )
    written = {c.id for c in circuits}
    manifest = {
        "exported_from": what,
        "gated": gated,
        "gates_lost": len(lost),
        "circuits": [
            {
                "id": c.id,
                "scope": f"{c.tier}:{c.scope}" if c.scope else c.tier,
                "label": c.label,
                "gated": c.gate is not None,
                "written": c.id in written,
            }
            for c in every
        ],
    }
    atomic_write(out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return out_dir


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():  # PEFT matches a pattern key against the end of the module name
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def import_peft(adapter_dir: Path, layers: dict[str, StackedLinear], tick: int, label: str | None = None) -> Circuit:
    """A PEFT LoRA adapter as one circuit (in no scope yet), PEFT's scaling folded into B."""
    cfg_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise IncompatibleAdapterError(
                f"{path} is missing: {adapter_dir} is not a PEFT adapter directory "
                "(expected adapter_config.json and adapter_model.safetensors)"
            )
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleAdapterError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA imports")
    if config.get("use_dora"):
        raise IncompatibleAdapterError(f"{cfg_path}: DoRA adapters are not low-rank deltas and cannot be imported")
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    raw: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        m = KEY_RE.match(key)
        if m is None:
            continue  # biases, modules_to_save, embeddings: not part of the low-rank delta
        raw.setdefault(m["module"], {})[m["which"]] = tensor
    unknown = sorted(set(raw) - set(layers))
    if unknown:
        raise IncompatibleAdapterError(
            f"{adapter_dir} adapts modules this DynamicLoRA does not: {unknown[:5]}; include them with "
            "AdapterConfig(target_modules=...) or import into a model with the same architecture"
        )
    factors = {}
    for module, ab in raw.items():
        missing = {"A", "B"} - set(ab)
        if missing:
            raise IncompatibleAdapterError(f"{weights_path}: module {module!r} lacks lora_{missing.pop()}.weight")
        layer = layers[module]
        if ab["A"].shape[1] != layer.in_features or ab["B"].shape[0] != layer.out_features:
            raise IncompatibleAdapterError(
                f"{weights_path}: module {module!r} has A {tuple(ab['A'].shape)} and B {tuple(ab['B'].shape)}, but "
                f"this model needs A (r × {layer.in_features}) and B ({layer.out_features} × r): the adapter was "
                "trained on another base model"
            )
        rank = _pattern_value(rank_pattern, module, r)
        mod_alpha = _pattern_value(alpha_pattern, module, alpha)
        scaling = mod_alpha / (math.sqrt(rank) if rslora else rank)
        factors[module] = (ab["A"].float(), ab["B"].float() * scaling)
    if not factors:
        raise IncompatibleAdapterError(f"{weights_path} holds no lora_A/lora_B weights")
    return Circuit(
        factors=factors,
        tier="",
        scope="",
        created_tick=tick,
        label=label or f"imported from {adapter_dir.name}",
        history=[{"event": "imported", "from": str(adapter_dir), "tick": tick}],
    )
