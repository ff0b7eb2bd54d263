"""Resonance consensus: how circuits of several contributors combine into shared circuits.

Proposals bound for one shared scope (agents' circuits for their swarm, swarms' for their domain, domains' for
the foundation) are compared by the cosine of their deltas, ``cos_ij = ⟨Δ_i, Δ_j⟩ / (‖Δ_i‖ ‖Δ_j‖)`` with
``⟨B₁A₁, B₂A₂⟩ = sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ))`` (no dense matrix). For proposal i, over the *other* contributors c:

* resonance ``S_i = (|contributors_i| − 1) + Σ_c max(0, best cos with c)`` (a proposal that already stands for
  several contributors, e.g. a cache entry several agents asked for, brings its own support),
* opposition ``O_i = Σ_c max(0, −worst cos with c)``.

A proposal enters only if ``S_i ≥ s`` (``resonance_threshold``), and only its *resonant part* enters: its
projection ``E_i`` onto the span of the deltas of the other contributors' proposals it resonates with (positive
cosine); all of it when its support is its own (a proposal several contributors stand behind). It enters with
weight ``w_i = min(G_max, 1 + γ·S_i) / (1 + S_ext_i + O_i)``; the shared delta is ``Σ w_i E_i``.
Consequences (tested in tests/test_swarms.py):

* gain law — N contributors of the same delta Δ give ``min(G_max, 1 + γ(N − 1))·Δ`` (γ = 0 by default: exactly
  Δ; see docs/swarms.md): at least one contribution,
  amplified by γ per extra contributor, capped at ``G_max``;
* opposed deltas cancel: a lone Δ against a lone −Δ has no resonance, so nothing enters; opposition to a
  resonating group divides its weight (two agents for Δ against one for −Δ give ``2·G(2)/3·Δ``);
* orthogonal deltas are both kept: groups in orthogonal directions do not see each other;
* poisoning bound — a component that no other contributor's delta carries enters with weight 0 from its own
  proposal (it is projected away). It can only leak through an honest proposal's projection onto the poisoner's
  delta when that is the honest one's only partner, by at most ``w·‖Δ_honest‖·cosθ·sinθ ≤ ½·w·‖Δ_honest‖``;
  with two honest partners sharing the pattern it leaks nothing. ``bench swarm`` measures it.

Two circuits resonate only where they both act: cosines between proposals whose gates no input reaches together
(gates.overlap) count as 0, neither support nor opposition. On SmolLM2, circuits of unrelated facts learned
by different agents have cosines of 0.1 to 0.3 (their keys come from similar inputs, their B factors write
similar tokens): three such partners summed to a support above the threshold, and agents' private facts
entered the swarm. Gated to different prompts, they no longer meet.

The shared delta becomes one circuit per group of resonating proposals (``Consensus.groups``): two patterns that
arrive in the same tick stay two circuits. Each is re-factorized from the stacked factors (QR of both sides and
an SVD of the small core), so nothing of size out × in is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..circuits import Circuit, Factors, frobenius_inner, inner_products
from ..gates import overlap


@dataclass
class Proposal:
    """A circuit offered to a shared scope, and who stands behind it."""

    circuit: Circuit
    contributors: frozenset[str]  # agents (for a swarm), swarms (for a domain) or domains (for the foundation)
    owner: str = ""  # the scope it leaves if it enters ("" when it lives in no scope, e.g. a cache consolidation)
    stability: float = 0.0
    critical: bool = False
    target: str = ""  # the shared scope it is bound for


@dataclass
class Verdict:
    support: float  # S_i
    opposition: float  # O_i
    weight: float  # w_i (0 when it does not enter)
    enters: bool
    partners: list[int] = field(default_factory=list)  # proposals of other contributors with a positive cosine
    resonant_fraction: float = 0.0  # ‖E_i‖ / ‖Δ_i‖


@dataclass
class Consensus:
    verdicts: list[Verdict]
    coefficients: torch.Tensor  # (n,): shared delta = Σ_k coefficients[k] · Δ_k
    cosines: torch.Tensor  # (n, n), 0 between circuits whose gates do not overlap

    @property
    def entered(self) -> list[int]:
        return [i for i, v in enumerate(self.verdicts) if v.enters]

    def groups(self, threshold: float) -> list[list[int]]:
        """The shared delta split by pattern: connected components of ``cos ≥ threshold`` among the proposals with
        a non-zero coefficient that hold an entering proposal. A term outside all of them (an entering proposal's
        projection landing on a weakly related partner) joins the group it has the highest cosine with, so the
        groups' terms still add up to the whole shared delta. Each group sorted, in order of first index."""
        terms = [i for i in range(len(self.verdicts)) if float(self.coefficients[i]) != 0]
        label = {i: i for i in terms}

        def root(i: int) -> int:
            while label[i] != i:
                i = label[i]
            return i

        for a in terms:
            for b in terms:
                if a < b and float(self.cosines[a, b]) >= threshold:
                    label[root(b)] = root(a)
        components: dict[int, list[int]] = {}
        for i in terms:
            components.setdefault(root(i), []).append(i)
        groups = [g for g in components.values() if any(self.verdicts[i].enters for i in g)]
        if not groups:
            return []
        for stray in (g for g in components.values() if not any(self.verdicts[i].enters for i in g)):
            for i in stray:
                nearest = max(range(len(groups)), key=lambda k: max(float(self.cosines[i, j]) for j in groups[k]))
                groups[nearest].append(i)
        return sorted((sorted(g) for g in groups), key=lambda g: g[0])


ORTHOGONAL = 1e-6  # |cosine| below this is orthogonal (the rounding noise of the factor products)


def gram(circuits: list[Circuit]) -> torch.Tensor:
    """``G[i, j] = ⟨Δ_i, Δ_j⟩`` (Frobenius, summed over modules, scales included), from the factors."""
    return inner_products(circuits, circuits)


def resonate(
    proposals: list[Proposal], threshold: float, gain: float, max_gain: float, g: torch.Tensor | None = None
) -> Consensus:
    """The resonance rule of the module docstring: who enters, with which weight, as which combination."""
    n = len(proposals)
    g = gram([p.circuit for p in proposals]) if g is None else g
    norms = g.diagonal().clamp_min(0).sqrt()
    cos = g / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    cos[cos.abs() < ORTHOGONAL] = 0.0  # rounding noise: such a pair neither supports nor opposes
    for i in range(n):  # where no input reaches both, two circuits neither support nor oppose each other
        for j in range(i + 1, n):
            if not overlap(proposals[i].circuit.gate, proposals[j].circuit.gate):
                cos[i, j] = cos[j, i] = 0.0
    coefficients = torch.zeros(n, dtype=torch.float64)
    verdicts = []
    for i, p in enumerate(proposals):
        best: dict[str, float] = {}
        worst: dict[str, float] = {}
        partners = []
        for j, q in enumerate(proposals):
            if j == i or q.contributors & p.contributors or norms[i] == 0 or norms[j] == 0:
                continue
            c = float(cos[i, j])
            for who in q.contributors:
                best[who] = max(best.get(who, 0.0), c)
                worst[who] = min(worst.get(who, 0.0), c)
            if c > 0:
                partners.append(j)
        external = sum(max(0.0, v) for v in best.values())
        support = len(p.contributors) - 1 + external
        opposition = sum(max(0.0, -v) for v in worst.values())
        enters = support >= threshold and bool(norms[i] > 0)
        weight, fraction = 0.0, 0.0
        if enters:
            weight = min(max_gain, 1.0 + gain * support) / (1.0 + external + opposition)
            if len(p.contributors) > 1:  # its support is its own (several contributors stand behind it)
                coefficients[i] += weight
                fraction = 1.0
            else:  # E_i: least-squares projection of Δ_i onto span{Δ_j : j resonates with it}
                sub = g[partners][:, partners]
                c = torch.linalg.lstsq(sub, g[partners, i].unsqueeze(1), rcond=1e-10).solution.squeeze(1)
                coefficients[partners] += weight * c
                fraction = float((c @ sub @ c).clamp_min(0).sqrt() / norms[i])
        verdicts.append(Verdict(support, opposition, weight, enters, partners, fraction))
    return Consensus(verdicts, coefficients, cos)


def combine(terms: list[tuple[Circuit, float]], relative_tolerance: float = 1e-6) -> Factors:
    """Factors of ``Σ coefficient · Δ_circuit`` at its numerical rank, per module, without dense matrices.

    Per module: stack ``A`` rows and ``coefficient·scale·B`` columns (rank R), take QR of ``B_cat`` and of
    ``A_catᵀ``, SVD the R × R core, and keep singular values above ``relative_tolerance`` of the largest. The
    returned A has orthonormal rows (a key, like a spawned circuit's) and B carries the singular values.
    """
    modules = sorted({m for c, _ in terms for m in c.factors})
    out: Factors = {}
    for name in modules:
        a_parts, b_parts = [], []
        for c, coefficient in terms:
            if name in c.factors and coefficient != 0:
                a, b = c.factors[name]
                a_parts.append(a.double())
                b_parts.append(b.double() * (coefficient * c.scale))
        if not a_parts:
            continue
        a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
        qb, rb = torch.linalg.qr(b_cat)
        qa, ra = torch.linalg.qr(a_cat.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        keep = int((s > relative_tolerance * s[0]).sum()) if len(s) and s[0] > 0 else 0
        keep = max(keep, 1)
        new_a = (qa @ vh[:keep].T).T
        new_b = qb @ (u[:, :keep] * s[:keep])
        device = a_parts[0].device
        out[name] = (new_a.float().contiguous().to(device), new_b.float().contiguous().to(device))
    return out


def norm(circuit: Circuit) -> float:
    return max(frobenius_inner(circuit, circuit), 0.0) ** 0.5
