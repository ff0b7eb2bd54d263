"""Circuit keys: a new circuit's A rows from the inputs it is made for, and how much an input matches a key.

A new circuit's A rows are the top right-singular vectors of the interaction's own input activations on each
module (explained-variance initialisation, cf. EVA, Paischer et al. 2024) and B starts at zero, so the stack's
output is unchanged at spawn and the circuit's activation afterwards measures how much an input resembles the
one it was made for.
"""

from __future__ import annotations

import torch

from .circuits import Circuit

MAX_KEY_SCALE = 20.0  # a rescaled key's rows are at most this long (see init_factors)


def init_factors(
    inputs: dict[str, torch.Tensor],
    out_features: dict[str, int],
    rank: int,
    from_activations: bool,
    generator: torch.Generator,
    protected: dict[str, torch.Tensor] | None = None,
    rescale: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A (r, in) with orthonormal rows and B (out, r) = 0 for every module.

    ``protected`` maps modules to orthonormal bases (in, k) of subspaces the new keys must stay out of (the keys
    of SCREENED circuits, the background): inputs and random completions are projected onto their orthogonal
    complement, as O-LoRA keeps a new task's LoRA subspace orthogonal to earlier ones. ``rescale``: A's rows are
    then scaled so that its largest activation on ``inputs`` equals their largest norm (at most ``MAX_KEY_SCALE``),
    so that B learns at the rate an unprojected key gives it.
    """
    factors = {}
    for name, x in inputs.items():
        x = x.reshape(-1, x.shape[-1]).float().cpu()  # (T, in)
        basis = None if protected is None else protected.get(name)

        def complement(v: torch.Tensor) -> torch.Tensor:
            return v if basis is None else v - (v @ basis) @ basis.T

        in_features = x.shape[1]
        rows = torch.zeros(0, in_features)
        if from_activations:
            _, sv, vh = torch.linalg.svd(complement(x), full_matrices=False)  # (min(T, in), in)
            rows = vh[:rank][sv[:rank] > 1e-6 * max(float(sv[0]), 1e-12)] if len(sv) else rows
        if rows.shape[0] < rank:  # fewer usable directions than rank: complete with random ones
            extra = complement(torch.randn(rank - rows.shape[0], in_features, generator=generator))
            q, _ = torch.linalg.qr(torch.cat([rows, extra], 0).T)  # orthonormal columns, first ones span `rows`
            rows = q.T[:rank]
        if rescale and basis is not None:
            reach = float((x @ rows.T).norm(dim=1).max())
            rows = rows * min(float(x.norm(dim=1).max()) / max(reach, 1e-12), MAX_KEY_SCALE)
        factors[name] = (rows.contiguous(), torch.zeros(out_features[name], rank))
    return factors


def background_bases(inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Per module, an orthonormal basis (in, k) of the top ``k`` principal directions (uncentered: the mean
    direction first) of ordinary text's inputs ``(N, in)``."""
    out = {}
    for name, x in inputs.items():
        _, _, vh = torch.linalg.svd(x.float().cpu(), full_matrices=False)
        out[name] = vh[:k].T.contiguous()
    return out


def joined_bases(*bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module, an orthonormal basis of the span of the given bases (in, k) together."""
    out = {}
    for name in {n for b in bases for n in b}:
        q, r = torch.linalg.qr(torch.cat([b[name] for b in bases if name in b], 1))
        out[name] = q[:, r.diagonal().abs() > 1e-6]
    return out


def screened_bases(circuits: list[Circuit]) -> dict[str, torch.Tensor]:
    """Per module, an orthonormal basis (in, k) of the span of the SCREENED circuits' keys."""
    screened = [c for c in circuits if c.phase == "SCREENED"]
    return joined_bases(*({m: a.detach().float().cpu().T for m, (a, _) in c.factors.items()} for c in screened))


def key_activations(circuits: list[Circuit], inputs: dict[str, torch.Tensor]) -> list[float]:
    """How much each circuit's key (its A rows) captures of these inputs, in [0, 1].

    Per module ``‖X A_cᵀ‖² / (‖X‖² · rms(A_c)²)``, averaged over the modules the circuit covers, then the square
    root: 1 when every input lies in the circuit's row space, 0 when orthogonal to it.
    """
    if not circuits:
        return []
    energy = torch.zeros(len(circuits))
    counts = torch.zeros(len(circuits))
    for name, x in inputs.items():
        x = x.reshape(-1, x.shape[-1]).float()
        total = x.pow(2).sum().clamp_min(1e-12)
        for i, c in enumerate(circuits):
            if name in c.factors:
                a = c.factors[name][0].float().to(x.device)
                rms2 = a.pow(2).sum() / a.shape[0]
                if rms2 > 0:
                    energy[i] += float((x @ a.T).pow(2).sum() / total / rms2)
                    counts[i] += 1
    return (energy / counts.clamp_min(1)).sqrt().tolist()
