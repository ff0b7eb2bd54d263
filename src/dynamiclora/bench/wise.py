"""A WISE-style routed side memory (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing
of Large Language Models", NeurIPS 2024), implemented from the paper's description as a baseline for
``bench editing``.

* The side memory is a copy ``W'`` of one late MLP down-projection (WISE edits a layer about 85% of the way into
  the model: layer 27 of LLaMA-2-7B's 32; here ``round(0.85 × layers)``). Edits train ``W'`` only, through a fixed
  random gradient mask of ratio ``mask_ratio`` (one knowledge shard; WISE's merging of several shards is left out).
* The router: an input's activation score is ``Δ(x) = mean over its prompt tokens of ‖a(x) (W' − W)ᵀ‖``, with a(x)
  the down-projection's input. The side memory answers the whole sequence when ``Δ(x) > ε``; the main memory
  (the base) otherwise. ``ε = act_ratio × the lowest score among the edits so far`` (WISE's calibration).
* Each edit: ``steps`` steps of plain SGD (lr 1.0, as WISE), each on the target's cross-entropy on the edit
  prompt and on it after ``prefixes`` random prefixes (short greedy continuations of the base model, WISE's
  augmentation), plus the margin loss ``max(0, Δ(x_i) − α) + max(0, β − Δ(x_e)) + max(0, γ − (Δ(x_e) − Δ(x_i)))``
  on ``irrelevant`` inputs x_i (drawn from the router's fixed reference prompts, never an evaluation prompt).
  α, β, γ are WISE's 5 / 20 / 10 scaled by this model's typical down-projection output norm over 20 (the paper's
  values are for LLaMA-2-7B's activations). Fewer prefixes, irrelevant inputs and steps than the paper's, to fit
  a CPU.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F

from ..continual.methods import Example, Method
from ..routing import REFERENCE_PROMPTS

PREFIX_SEEDS = ("The", "In", "A", "When", "It", "Today", "This", "We")


class WiseSideMemory(Method):
    name = "WISE-style side memory"

    def __init__(
        self,
        model,
        tokenizer,
        steps: int = 10,
        lr: float = 1.0,
        mask_ratio: float = 0.2,
        act_ratio: float = 0.88,
        prefixes: int = 1,
        irrelevant: int = 2,
        seed: int = 0,
    ) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = self.model.model.layers
        self.layer = layers[round(0.85 * len(layers)) - 1].mlp.down_proj
        self.main = self.layer.weight.detach().clone()
        self.side = torch.nn.Parameter(self.main.clone())
        g = torch.Generator().manual_seed(seed)
        self.mask = (torch.rand(self.main.shape, generator=g) < mask_ratio).float()
        # plain SGD, as WISE edits: a gradient step keeps the side memory's change in the span of the edit's own
        # activations, which is what lets the activation score tell edits from other inputs (Adam's per-element
        # normalization spreads the change over every masked weight)
        self.optimizer = torch.optim.SGD([self.side], lr=lr)
        self.steps, self.act_ratio, self.rng = steps, act_ratio, random.Random(seed)
        self.n_prefixes, self.n_irrelevant = prefixes, irrelevant
        self.epsilon: float | None = None  # act_ratio × the lowest edit score seen
        self._mode = "main"  # the hook's switch: "side" applies W', "main" W, "routed" chooses by Δ(x) > ε
        self._scores: list[torch.Tensor] = []
        self._prompt_tokens: int | None = None
        self.layer.register_forward_hook(self._hook)
        self.irrelevant = [list(tokenizer(p)["input_ids"]) for p in REFERENCE_PROMPTS]
        self.prefixes = [self._prefix(tokenizer, s) for s in PREFIX_SEEDS]
        scale = self._output_norm() / 20.0
        self.alpha, self.beta, self.gamma = 5.0 * scale, 20.0 * scale, 10.0 * scale

    # -- the routed layer ---------------------------------------------------------------------------
    def _hook(self, module, args, output):
        x = args[0]
        delta = F.linear(x, self.side - self.main)  # (B, T, out): what the side memory adds to the main output
        tokens = self._prompt_tokens or x.shape[1]
        score = delta[:, :tokens].norm(dim=-1).mean(dim=-1)  # (B,) the activation score
        self._scores.append(score)
        if self._mode == "routed":  # one pass, as WISE routes at the layer itself
            side = (score > self.epsilon).to(output.dtype)[:, None, None]
            return output + side * delta
        return output + delta if self._mode == "side" else output

    def _score(self, ids: list[int]) -> torch.Tensor:
        self._scores.clear()
        self._prompt_tokens = len(ids)
        self.model(input_ids=torch.tensor([ids]))
        return self._scores[-1][0]

    @torch.no_grad()
    def _prefix(self, tokenizer, seed_word: str) -> list[int]:
        ids = list(tokenizer(seed_word)["input_ids"])
        for _ in range(6):
            ids.append(int(self.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids

    @torch.no_grad()
    def _output_norm(self) -> float:
        norms = []
        handle = self.layer.register_forward_hook(lambda m, a, out: norms.append(out.norm(dim=-1).flatten()))
        for ids in self.irrelevant:
            self.model(input_ids=torch.tensor([ids]))
        handle.remove()
        return float(torch.cat(norms).median())

    # -- Method ---------------------------------------------------------------------------------------
    def learn(self, agent: str, example: Example) -> None:
        p, c = example
        variants = [p] + [pre + p for pre in self.rng.sample(self.prefixes, self.n_prefixes)]
        self._mode = "side"
        for _ in range(self.steps):
            loss = torch.zeros(())
            edit_scores = []
            for prompt in variants:
                ids = torch.tensor([prompt + c])
                labels = ids.clone()
                labels[:, : len(prompt)] = -100
                self._scores.clear()
                self._prompt_tokens = len(prompt)
                loss = loss + self.model(input_ids=ids, labels=labels).loss / len(variants)
                edit_scores.append(self._scores[-1][0])
            irrelevant = torch.stack([self._score(ids) for ids in self.rng.sample(self.irrelevant, self.n_irrelevant)])
            edit = torch.stack(edit_scores)
            margin = (
                (irrelevant - self.alpha).clamp_min(0).mean()
                + (self.beta - edit).clamp_min(0).mean()
                + (self.gamma - (edit.min() - irrelevant.max())).clamp_min(0)
            )
            self.optimizer.zero_grad(set_to_none=True)
            (loss + margin).backward()
            self.side.grad.mul_(self.mask)  # the shard's fixed random mask
            self.optimizer.step()
        self._mode = "main"
        with torch.no_grad():
            score = float(self._score(p))
        self.epsilon = min(self.epsilon or float("inf"), self.act_ratio * score)

    @torch.no_grad()
    def logits(self, agent: str, ids: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
        self._mode = "main" if self.epsilon is None else "routed"
        self._prompt_tokens = prompt_tokens or ids.shape[1]
        try:
            return self.model(input_ids=ids).logits
        finally:
            self._mode = "main"

    def trainable_parameters(self) -> int:
        return self.side.numel()
