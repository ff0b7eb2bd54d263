"""The learners compared on a stream, each given the same interactions and the same gradient-step budget.

One interaction is one (prompt, completion) example; every method spends ``steps`` optimizer steps on it (the
``steps_per_learn`` of DynamicLoRA's context tier) with Adam at the same learning rate and LoRA rank.

* ``DynamicLoRAMethod`` — ``agent.learn`` into the tiered memory (one agent per task's owner, one team).
* ``SequentialLoRA`` — one PEFT LoRA fine-tuned on each example as it comes (the real library).
* ``Replay`` — the same, each step's batch completed with one example drawn from a buffer of past tasks.
* ``OrthogonalLoRA`` — O-LoRA-style (Wang et al., 2023): a new PEFT adapter per task, the old ones frozen, and
  a penalty ``λ Σ ‖A_new A_oldᵀ‖²`` keeping the new adapter's input subspace orthogonal to the old ones.
* ``FastSlowEMA`` — CLS-ER-style (Arani et al., 2022): a plastic LoRA trained with replay and a consistency
  loss to a stable model, the exponential moving average of its weights; the stable model is evaluated.
* multi-task (upper bound) — ``SequentialLoRA`` given all tasks' interactions shuffled into one stream.
"""

from __future__ import annotations

import copy
import random
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from ..config import AdapterConfig, DynamicLoRAConfig, DynamicsConfig, LearningConfig
from ..core import DynamicLoRA

Example = tuple[list[int], list[int]]  # (prompt ids, completion ids incl. EOS)


def encode(tokenizer, prompt: str, completion: str) -> Example:
    """The same tokenization ``Agent.learn`` uses: prompt with special tokens, completion without, then EOS."""
    p = list(tokenizer(prompt)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    return p, c


def produces(logits: torch.Tensor, example: Example) -> bool:
    """Greedy decoding yields the completion (EOS excluded): argmax under teacher forcing at every position."""
    p, c = example
    target = torch.tensor(c[:-1] if len(c) > 1 else c)
    predicted = logits[0, len(p) - 1 : len(p) - 1 + len(target)].argmax(-1).cpu()
    return bool((predicted == target).all())


@torch.no_grad()
def perplexity(logits_of, chunks: list[torch.Tensor]) -> float:
    """Token-level perplexity of ``logits_of(ids)`` over the chunks, pooled over all their tokens."""
    total, count = 0.0, 0
    for ids in chunks:
        total += float(F.cross_entropy(logits_of(ids)[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return float(torch.tensor(total / count).exp())


class Method(ABC):
    name = "method"

    @abstractmethod
    def learn(self, agent: str, example: Example) -> None:
        """One interaction: the method's whole step budget spent on this example."""

    def end_task(self, examples: list[Example]) -> None:
        """Called when a task's rounds are over (with the task's examples)."""

    @abstractmethod
    def logits(self, agent: str, ids: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
        """(1, L, V) logits of ``agent``'s model as it is now; ``ids[:, :prompt_tokens]`` is the prompt (the request
        as generation would see it), the rest a completion being scored."""

    @abstractmethod
    def trainable_parameters(self) -> int:
        """Parameters the method has trained (for DynamicLoRA: the context circuits it created)."""

    @torch.no_grad()
    def accuracy(self, agent: str, examples: list[Example]) -> float:
        hits = [produces(self.logits(agent, torch.tensor([p + c]), len(p)), (p, c)) for p, c in examples]
        return sum(hits) / len(hits) if hits else 0.0

    @torch.no_grad()
    def greedy(self, agent: str, prompt: list[int], tokens: int, eos: int | None = None) -> list[int]:
        """Up to ``tokens`` greedy tokens after ``prompt`` (routed on the prompt), stopping after ``eos``."""
        out: list[int] = []
        while len(out) < tokens and (not out or out[-1] != eos):
            logits = self.logits(agent, torch.tensor([prompt + out]), len(prompt))
            out.append(int(logits[0, -1].argmax()))
        return out

    def perplexity(self, agent: str, chunks: list[torch.Tensor]) -> float:
        return perplexity(lambda ids: self.logits(agent, ids), chunks)


# fact circuits (docs/editing.md): token gates, a rank-1 circuit on every value projection (99 KB with its gate on
# SmolLM2), trained on the prompt and on the learner's own chat rendering of it; DynamicLoRAMethod's keywords
FACT_CIRCUITS = dict(route_match="tokens", rank=1, circuit_modules=(r"self_attn\.v_proj",), learn_variants=("chat",))
# fact circuits with strict gates, subject locality, keys off 16 background directions, from the route layer on
# (routed inside the forward): the editing benchmark's facts-late
FACTS_LATE = dict(FACT_CIRCUITS, route_strict=True, subject_locality=2.0, key_background=16, circuits_after_route=True)


class DynamicLoRAMethod(Method):
    name = "DynamicLoRA"

    def __init__(
        self,
        model,
        tokenizer,
        agents: list[str],
        tick_interval: int = 100,
        lr: float = 1e-2,
        routing: bool = True,
        capacity: int = 32,
        radius: float | None = None,
        route_module: str | None = None,
        route_match: str = "pooled",
        circuit_modules: tuple[str, ...] | None = None,
        rank: int = 8,
        learn_variants: tuple[str, ...] = (),
        route_strict: bool = False,
        route_ordered: bool = False,
        subject_locality: float = 0.0,
        key_background: int = 0,
        circuits_after_route: bool = False,
    ) -> None:
        # capacity: the longest stream holds 20 facts of one agent; the default 16 would drop the oldest ones
        cfg = DynamicLoRAConfig(
            adapter=AdapterConfig(circuit_rank=rank),
            dynamics=DynamicsConfig(tick_interval=tick_interval),
            learning=LearningConfig(
                learning_rate=lr,
                routing=routing,
                context_capacity=capacity,
                **({} if radius is None else {"route_radius": radius}),
                route_module=route_module,
                route_match=route_match,
                circuit_modules=circuit_modules,
                learn_variants=learn_variants,
                route_strict=route_strict,
                route_ordered=route_ordered,
                subject_locality=subject_locality,
                key_background=key_background,
                circuits_after_route=circuits_after_route,
            ),
        )
        self.dl = DynamicLoRA(model, tokenizer, cfg)
        for a in agents:
            self.dl.agent(a, swarm="team", domain="work")
        details = (
            ([] if routing else ["no routing"])
            + ([f"route radius {radius:g}"] if radius is not None else [])
            + ([f"routed at {route_module}"] if route_module is not None else [])
            + (["token gates"] if route_match == "tokens" else [])
            + ([f"rank {rank}"] if rank != 8 else [])
            + ([f"on {', '.join(circuit_modules)}"] if circuit_modules else [])
            + ([f"learns {', '.join(learn_variants)} variants"] if learn_variants else [])
            + (["strict gates"] if route_strict else [])
            + (["ordered gates"] if route_ordered else [])
            + ([f"subject locality {subject_locality:g}"] if subject_locality else [])
            + ([f"keys off {key_background} background directions"] if key_background else [])
            + (["circuits from the route layer on"] if circuits_after_route else [])
            + ([f"tick every {tick_interval}"] if tick_interval != 100 else [])
        )
        if details:
            self.name = f"DynamicLoRA ({', '.join(details)})"

    def learn(self, agent: str, example: Example) -> None:
        p, c = example
        text = self.dl.tokenizer.decode
        self.dl.agent(agent).learn(text(p, skip_special_tokens=True), text(c, skip_special_tokens=True))

    def logits(self, agent: str, ids: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
        return self.dl.agent(agent).logits(ids, route_tokens=prompt_tokens)

    def trainable_parameters(self) -> int:
        return sum(
            a.numel() + b.numel()
            for key, scope in self.dl.hierarchy.scopes.items()
            if key.tier == "context"
            for c in scope.circuits.values()
            for a, b in c.factors.values()
        )


class SequentialLoRA(Method):
    name = "sequential LoRA (PEFT)"

    def __init__(self, model, tokenizer, rank: int = 8, lr: float = 1e-2, steps: int = 6, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0)
        self.model = get_peft_model(copy.deepcopy(model), self.config, adapter_name="t0")
        self.model.eval()  # no dropout anywhere; gradients flow all the same
        self.lr, self.steps, self.pad = lr, steps, tokenizer.pad_token_id or 0
        self.optimizer = torch.optim.Adam(self._trainable(), lr=lr)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def batch(self, example: Example) -> list[Example]:
        return [example]

    def _tensors(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), self.pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, c) in enumerate(batch):
            seq = p + c
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(p) : len(seq)] = torch.tensor(c)
            mask[row, : len(seq)] = 1
        return ids, labels, mask

    def reference(self, batch: list[Example], ids, mask) -> torch.Tensor | None:
        """Computed before the step's forward (it may swap weights in place)."""
        return None

    def extra_loss(self, batch: list[Example], ids, mask, logits, reference) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def learn(self, agent: str, example: Example) -> None:
        for _ in range(self.steps):
            self.step(self.batch(example))

    def step(self, batch: list[Example]) -> None:
        """One optimizer step on a batch of examples."""
        ids, labels, mask = self._tensors(batch)
        reference = self.reference(batch, ids, mask)
        out = self.model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss
        extra = self.extra_loss(batch, ids, mask, out.logits, reference)
        if extra is not None:
            loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._trainable(), 1.0)
        self.optimizer.step()
        self.after_step()

    def logits(self, agent: str, ids: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def trainable_parameters(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)


class MultiTaskLoRA(SequentialLoRA):
    """The upper bound: every task's examples available from the start, each step on a batch drawn i.i.d. from
    all of them (the same number of steps as the stream's learners, ``batch_size`` times the examples per step)."""

    name = "multi-task LoRA (upper bound)"

    def fit(self, pool: list[Example], steps: int, batch_size: int = 4) -> None:
        for _ in range(steps):
            self.step([self.rng.choice(pool) for _ in range(batch_size)])


class Replay(SequentialLoRA):
    name = "experience replay (PEFT)"

    def __init__(self, *args: Any, buffer_size: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer: list[Example] = []
        self.buffer_size, self.seen = buffer_size, 0

    def batch(self, example: Example) -> list[Example]:
        return [example] + ([self.rng.choice(self.buffer)] if self.buffer else [])

    def end_task(self, examples: list[Example]) -> None:
        for e in examples:  # reservoir sampling over everything seen
            self.seen += 1
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(e)
            elif (j := self.rng.randrange(self.seen)) < self.buffer_size:
                self.buffer[j] = e


class OrthogonalLoRA(SequentialLoRA):
    name = "O-LoRA-style (PEFT)"

    def __init__(self, *args: Any, penalty: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalty, self.tasks = penalty, 1

    def end_task(self, examples: list[Example]) -> None:
        new = f"t{self.tasks}"
        self.model.add_adapter(new, self.config)
        self.model.base_model.set_adapter([f"t{k}" for k in range(self.tasks + 1)])
        for n, p in self.model.named_parameters():
            if "lora_" in n:
                p.requires_grad = f".{new}." in n
        self.tasks += 1
        self.optimizer = torch.optim.Adam(self._trainable(), lr=self.lr)

    def extra_loss(self, batch, ids, mask, logits, reference) -> torch.Tensor | None:
        if self.tasks == 1:
            return None
        new = f"t{self.tasks - 1}"
        total = 0.0
        for module in self.model.modules():
            if hasattr(module, "lora_A") and new in module.lora_A:
                a_new = module.lora_A[new].weight
                for k in range(self.tasks - 1):
                    total = total + (a_new @ module.lora_A[f"t{k}"].weight.detach().T).pow(2).sum()
        return self.penalty * total


class FastSlowEMA(Replay):
    name = "CLS-ER-style fast/slow EMA (PEFT)"

    def __init__(self, *args: Any, decay: float = 0.9, consistency: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decay, self.consistency = decay, consistency
        self.slow = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _swap(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.slow:
                    tmp = p.detach().clone()
                    p.copy_(self.slow[n])
                    self.slow[n] = tmp

    def reference(self, batch, ids, mask) -> torch.Tensor | None:
        if len(batch) < 2:
            return None
        self._swap()
        try:
            with torch.no_grad():
                return self.model(input_ids=ids[1:], attention_mask=mask[1:]).logits
        finally:
            self._swap()

    def extra_loss(self, batch, ids, mask, logits, reference) -> torch.Tensor | None:
        if reference is None:
            return None
        keep = mask[1:].unsqueeze(-1).float()
        return self.consistency * (((logits[1:] - reference) ** 2) * keep).sum() / keep.sum() / logits.shape[-1]

    def after_step(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.slow:
                    self.slow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    def logits(self, agent: str, ids: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
        self._swap()
        try:
            return self.model(input_ids=ids).logits
        finally:
            self._swap()
