"""Circuit extraction: which neurons a trajectory relied on, and how they connect.

The recorded layers form a chain of adapted modules whose weights carry one recorded activation space to the
next (by default each block's MLP: up-projection, then down-projection, then the next block's
up-projection). For every step and layer, the neurons above ``mean + 2·std`` of that step's activations are
active; a neuron counts if it was active at any step. An edge joins active neuron i of layer k and active
neuron j of layer k + 1 when ``|W_k[j, i]| > weight_threshold``, W_k being layer k's weight (out × in). The
extracted circuit is the union of the connected components with at least ``min_size`` neurons (the WaveGen
seed's numbers: threshold 0.1, five neurons).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

MLP_IN = re.compile(r"mlp\.(up_proj|c_fc|fc1|fc_in|dense_h_to_4h)$")
MLP_OUT = re.compile(r"mlp\.(down_proj|c_proj|fc2|fc_out|dense_4h_to_h)$")


@dataclass
class ExtractedCircuit:
    nodes: list[tuple[str, int]] = field(default_factory=list)  # (layer, neuron)
    edges: list[tuple[str, int, str, int, float]] = field(default_factory=list)  # (layer, i, next layer, j, weight)

    def __len__(self) -> int:
        return len(self.nodes)

    def summary(self, top: int = 8) -> dict:
        per_layer: dict[str, int] = {}
        for layer, _ in self.nodes:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        strongest = sorted(self.edges, key=lambda e: -abs(e[4]))[:top]
        return {
            "neurons": len(self.nodes),
            "edges": len(self.edges),
            "per_layer": per_layer,
            "strongest_edges": [[a, i, b, j, round(w, 4)] for a, i, b, j, w in strongest],
        }


def default_chain(modules: dict[str, tuple[int, int]]) -> list[str]:
    """MLP in/out projections in model order, kept only while each one's output feeds the next one's input.

    ``modules`` maps adapted module names (in model order) to (in_features, out_features).
    """
    chain = [n for n in modules if MLP_IN.search(n) or MLP_OUT.search(n)]
    for a, b in zip(chain, chain[1:]):
        if modules[a][1] != modules[b][0]:
            return []
    return chain


def active_neurons(acts: torch.Tensor) -> set[int]:
    """Neurons above mean + 2·std of their step's activations, at any step. ``acts``: (steps, neurons)."""
    acts = acts.float().reshape(-1, acts.shape[-1])
    threshold = acts.mean(-1, keepdim=True) + 2 * acts.std(-1, keepdim=True)
    return set(torch.nonzero(acts > threshold)[:, 1].tolist())


def extract(
    activations: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    chain: list[str],
    weight_threshold: float = 0.1,
    min_size: int = 5,
) -> ExtractedCircuit:
    """The circuit of a trajectory from its activations per layer (steps × neurons) along ``chain``."""
    layers = [name for name in chain if name in activations]
    active = {name: sorted(active_neurons(activations[name])) for name in layers}
    edges = []
    for a, b in zip(layers, layers[1:]):
        if not active[a] or not active[b]:
            continue
        w = weights[a].float()[active[b]][:, active[a]]  # (|active b|, |active a|): W[j, i]
        for j_pos, i_pos in torch.nonzero(w.abs() > weight_threshold).tolist():
            edges.append((a, active[a][i_pos], b, active[b][j_pos], float(w[j_pos, i_pos])))
    # connected components of the active neurons (union-find)
    parent: dict[tuple[str, int], tuple[str, int]] = {(n, i): (n, i) for n in layers for i in active[n]}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, i, b, j, _ in edges:
        parent[root((a, i))] = root((b, j))
    components: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for node in parent:
        components.setdefault(root(node), []).append(node)
    keep = {node for members in components.values() if len(members) >= min_size for node in members}
    order = {name: k for k, name in enumerate(layers)}
    return ExtractedCircuit(
        sorted(keep, key=lambda n: (order[n[0]], n[1])),
        [e for e in edges if (e[0], e[1]) in keep],
    )
