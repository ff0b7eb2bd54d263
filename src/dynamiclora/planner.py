"""Builds the per-module plans that the adapted layers apply, and caches what can be cached.

For a batch of rows (each row an agent), a scope is *merged* when its tier is in ``AdapterConfig.merged_tiers``,
whoever else shares the batch: its ungated circuits go into an effective weight ``W + Σ s·B A`` cached by the
content hashes of the merged scopes, so it is rebuilt only when their content changes; rows of other swarms or
domains use their own effective weight. All other circuits of a row are *unmerged*: concatenated along the rank
axis, padded to a common rank, one set per row, applied with ``bmm``. Gated circuits (see gates.py) of a merged
scope run unmerged, on the rows whose prompts reach them. Which path a row takes never depends on its batch-mates,
so a row's output is the same batched or alone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .circuits import Circuit, concat_factors
from .config import AdapterConfig
from .errors import InvalidInputError
from .hierarchy import Hierarchy, ScopeKey
from .stack import ModulePlan, StackedLinear

PLAN_CACHE_SIZE = 16  # batch compositions whose plans are kept (also bounded by AdapterConfig.plan_cache_bytes)


@dataclass
class BatchPlan:
    agent_ids: tuple[str, ...]
    modules: dict[str, ModulePlan]
    circuits: list[Circuit]  # usage columns of unmerged circuits
    merged_circuits: list[Circuit]  # usage columns of merged circuits
    row_columns: list[list[int]]  # per row: which usage columns belong to its stack
    hetero: bool

    def __post_init__(self) -> None:
        self.module_list = list(self.modules.values())  # in layer index order (the planner iterates layers)


def plan_nbytes(plan: BatchPlan) -> int:
    """Bytes of the factor tensors a plan holds (expanded views and storage shared within it counted once; the
    effective weights belong to the merge cache)."""
    seen: dict[int, int] = {}
    for m in plan.module_list:
        for t in (m.a, m.b, m.obs, m.group_a, m.group_obs, m.merged_a, m.merged_obs):
            if t is not None:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class Planner:
    def __init__(
        self,
        layers: dict[str, StackedLinear],
        hierarchy: Hierarchy,
        config: AdapterConfig,
        input_groups: list[list[str]] | None = None,
    ) -> None:
        self.layers = layers
        self.input_groups = input_groups or [[name] for name in layers]
        self.hierarchy = hierarchy
        self.config = config
        self._merged: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._plans: OrderedDict[tuple, BatchPlan] = OrderedDict()
        self._plan_bytes: dict[tuple, int] = {}
        self.merge_builds = 0  # how many effective-weight sets were computed (for tests and benchmarks)

    # -- public -----------------------------------------------------------------------------------
    def plan(
        self,
        agent_ids: list[str] | tuple[str, ...],
        trainable: bool = False,
        without: tuple[str, ...] = (),
        extra: tuple[Circuit, ...] = (),
        skip: tuple[frozenset[str], ...] | None = None,
    ) -> BatchPlan:
        """A plan for rows of these agents, leaving out the tiers in ``without``.

        ``extra`` circuits (not in any scope yet, e.g. one being internalized) are applied unmerged on every row.
        ``skip`` gives, per row, ids of unmerged circuits the row's input does not reach (see routing.py).
        Cached by scope versions unless ``trainable`` (then the factors must carry gradients) or ``extra`` is given.
        """
        agent_ids = tuple(agent_ids)
        skip = tuple(skip) if skip is not None and any(skip) else tuple(frozenset() for _ in agent_ids)
        if len(skip) != len(agent_ids):
            raise InvalidInputError(f"skip has {len(skip)} rows for {len(agent_ids)} agents; give one set per row")
        stacks = [tuple(k for k in self.hierarchy.agent(a).stack() if k.tier not in without) for a in agent_ids]
        involved = sorted({k for s in stacks for k in s})
        key = (agent_ids, without, skip, tuple(self.hierarchy.scopes[k].version for k in involved))
        if extra:
            return self._build(agent_ids, stacks, observe=not trainable, extra=tuple(extra), skip=skip)
        if not trainable and key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        plan = self._build(agent_ids, stacks, observe=not trainable, skip=skip)  # training runs without the probe
        if not trainable:
            self._plans[key] = plan
            self._plan_bytes[key] = plan_nbytes(plan)
            # bounded by count and by bytes: a heterogeneous plan holds its rows' factors (one rank-8 circuit on
            # every module of SmolLM2 is 9.3 MiB, so a 16-row plan is ~150 MiB)
            while len(self._plans) > 1 and (
                len(self._plans) > PLAN_CACHE_SIZE or self.plan_cache_bytes() > self.config.plan_cache_bytes
            ):
                oldest, _ = self._plans.popitem(last=False)
                del self._plan_bytes[oldest]
        return plan

    def plan_cache_bytes(self) -> int:
        """Bytes of factor tensors that the cached plans hold."""
        return sum(self._plan_bytes.values())

    def clear(self) -> None:
        self._merged.clear()
        self._plans.clear()
        self._plan_bytes.clear()

    # -- building ---------------------------------------------------------------------------------
    def _build(
        self,
        agent_ids: tuple[str, ...],
        stacks: list[tuple[ScopeKey, ...]],
        observe: bool = True,
        extra: tuple[Circuit, ...] = (),
        skip: tuple[frozenset[str], ...] = (),
    ) -> BatchPlan:
        """Rows are grouped twice, and every row computes exactly what it would alone: by the scopes of merged tiers
        (their effective weight; rows of other swarms or domains use theirs, in the same kernel) and by the circuits
        that run unmerged (rank-concatenated, applied per row with ``bmm`` whether the batch is mixed or not)."""
        scopes = self.hierarchy.scopes
        merged_tiers = self.config.merged_tiers
        row_merged = [tuple(k for k in s if k.tier in merged_tiers) for s in stacks]
        row_unmerged = [tuple(k for k in s if k.tier not in merged_tiers) for s in stacks]
        row_keys = list(zip(row_merged, row_unmerged, skip))
        groups = list(dict.fromkeys(row_keys))
        row_group = [groups.index(rk) for rk in row_keys]
        # a gated circuit cannot live in an effective weight (it acts on some rows only): it runs unmerged
        group_circuits = [
            [c for k in merged for c in scopes[k].circuits.values() if c.gate is not None and c.id not in left_out]
            + [c for k in keys for c in scopes[k].circuits.values() if c.id not in left_out]
            + list(extra)
            for merged, keys, left_out in groups
        ]
        circuits: list[Circuit] = list({c.id: c for gc in group_circuits for c in gc}.values())
        column = {c.id: i for i, c in enumerate(circuits)}
        rank = {c.id: c.rank for c in circuits}

        merge_groups = list(dict.fromkeys(row_merged))
        merged_sets = [[c for k in m for c in scopes[k].circuits.values() if c.gate is None] for m in merge_groups]
        weights = [self._merged_weights(list(m), cs) for m, cs in zip(merge_groups, merged_sets)]
        merged_circuits = merged_sets[0] if len(merge_groups) == 1 else []  # sampled usage: one merge group only
        merge_rows = [torch.tensor([i for i, m in enumerate(row_merged) if m == key]) for key in merge_groups]
        hetero = len(groups) > 1
        row_index = torch.tensor(row_group)

        covered = {name for c in circuits for name in c.factors}
        sampled = observe and bool(merged_circuits) and self.config.merged_usage_sample_rate > 0
        several_weights = len(merge_groups) > 1 and any(wt is not None for wt in weights)
        no_weight = weights[0] is None if len(merge_groups) == 1 else not several_weights
        bare = ModulePlan()  # shared by the modules that run their base layer alone (most, with fact circuits)
        modules = {}
        for name, layer in self.layers.items():
            # a module that none of the plan's circuits covers runs as the base layer (or merged weight) alone
            if no_weight and not sampled and name not in covered:
                modules[name] = bare
                continue
            w = layer.base_layer.weight
            dtype, device = w.dtype, w.device
            low = dtype in (torch.float16, torch.bfloat16)  # deltas are applied in float32, rounded once
            adapter_dtype = torch.float32 if low else dtype
            mp = ModulePlan(hetero=hetero, upcast=low)
            if len(merge_groups) == 1:
                mp.weight = None if weights[0] is None else weights[0][name]
            elif several_weights:
                mp.weight_rows = [
                    (rows.to(device), None if wt is None else wt[name]) for rows, wt in zip(merge_rows, weights)
                ]
            parts = (
                [self._factors(gc, layer, column, len(circuits), observe, rank) for gc in group_circuits]
                if name in covered
                else []
            )
            r_max = max(p[0].shape[0] for p in parts) if parts else 0
            if r_max > 0:
                if len(parts) == 1:  # one group of rows (not hetero): its factors as they are
                    a, b, obs = parts[0][0].unsqueeze(0), parts[0][1].unsqueeze(0), parts[0][2]
                else:
                    # padding ranks with zeros at the end changes no row's sums: a row batched equals the row alone
                    a = torch.stack([F.pad(p[0], (0, 0, 0, r_max - p[0].shape[0])) for p in parts])  # (U, R, in)
                    b = torch.stack([F.pad(p[1], (0, r_max - p[1].shape[1])) for p in parts])  # (U, out, R)
                    obs = torch.stack([F.pad(p[2], (0, 0, 0, r_max - p[2].shape[0])) for p in parts])  # (U, R, C)
                    if hetero:
                        a, b, obs = a[row_index], b[row_index], obs[row_index]  # (B, …): one set of factors per row
                    else:
                        obs = obs[0]  # (R, C); the factors stay (1, …) and are expanded over the batch
                mp.a = a.transpose(1, 2).contiguous().to(device, adapter_dtype)  # (B or 1, in, R)
                mp.b = b.transpose(1, 2).contiguous().to(device, adapter_dtype)  # (B or 1, R, out)
                mp.obs = obs.to(device)
            if sampled:
                ma, _, mobs = self._factors(
                    merged_circuits, layer, {c.id: i for i, c in enumerate(merged_circuits)}, len(merged_circuits)
                )
                mp.merged_a, mp.merged_obs = ma.detach().to(device, dtype), mobs.to(device)
            modules[name] = mp

        self._share_projections(modules, hetero)
        row_columns = [[column[c.id] for c in group_circuits[g]] for g in row_group]
        return BatchPlan(agent_ids, modules, circuits, merged_circuits, row_columns, hetero)

    def _share_projections(self, modules: dict[str, ModulePlan], hetero: bool) -> None:
        """Give the first adapted module of each input group the concatenated A of the group's adapted modules (one
        matmul instead of several)."""
        dim = 2  # rank axis of A: (B or 1, in, R)
        obs_dim = 1 if hetero else 0  # rank axis of the observation map: (B, R, C) or (R, C)
        for group in self.input_groups:
            plans = [modules[name] for name in group if modules[name].a is not None]  # (in layer order)
            if len(plans) < 2:
                continue
            offset = 0
            for p in plans:
                width = p.a.shape[dim]
                p.grouped, p.lo, p.hi = True, offset, offset + width
                offset += width
            plans[0].group_size = len(plans)
            plans[0].group_a = torch.cat([p.a for p in plans], dim).contiguous()
            plans[0].group_obs = torch.cat([p.obs for p in plans], obs_dim)

    @staticmethod
    def _factors(
        circuits: list[Circuit],
        layer: StackedLinear,
        column: dict[str, int],
        num_columns: int,
        observe: bool = True,
        rank: dict[str, int] | None = None,
    ):
        """A_cat (R, in), B_cat (out, R) and the observation map (R, C) of circuits on one layer (all zero when
        the plan will run without the usage probe). ``rank``: each circuit's rank by id, if known."""
        ranks = [rank[c.id] for c in circuits] if rank is not None else [c.rank for c in circuits]
        a, b = concat_factors(circuits, layer.name, layer.in_features, layer.out_features, ranks=ranks)
        obs = torch.zeros(a.shape[0], num_columns)
        offset = 0
        for c, r in zip(circuits, ranks) if observe else ():
            if layer.name in c.factors:
                ca = c.factors[layer.name][0].detach().float()
                rms2 = float(ca.pow(2).sum()) / max(r, 1)
                if rms2 > 0:
                    obs[offset : offset + r, column[c.id]] = 1.0 / rms2
            offset += r
        return a, b, obs

    def _merged_weights(self, keys: list[ScopeKey], circuits: list[Circuit]) -> dict[str, torch.Tensor] | None:
        if not circuits:
            return None
        scopes = self.hierarchy.scopes
        cache_key = tuple((str(k), scopes[k].content_hash()) for k in keys)
        if cache_key in self._merged:
            self._merged.move_to_end(cache_key)
            return self._merged[cache_key]
        weights = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                base = layer.base_weight()
                a, b = concat_factors(circuits, name, layer.in_features, layer.out_features)
                delta = b.to(base.device) @ a.to(base.device)  # float32
                weights[name] = (base.float() + delta).to(base.dtype).contiguous()
        self._merged[cache_key] = weights
        self.merge_builds += 1
        while len(self._merged) > self.config.merge_cache_size:
            self._merged.popitem(last=False)
        return weights
