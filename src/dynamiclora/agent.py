"""The per-agent handle and what a generation returns.

An :class:`Agent` holds nothing of its own: every call goes through the shared :class:`~dynamiclora.core.DynamicLoRA`
(its stack, its context tier, WaveGen). ``dl.agent(id)`` hands one out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidInputError
from .hierarchy import Snapshot
from .learning import LearnResult

if TYPE_CHECKING:
    from .core import DynamicLoRA


@dataclass
class GenerationResult:
    agent_id: str
    prompt: str
    text: str
    token_ids: list[int]
    finished: bool  # stopped on EOS rather than on max_new_tokens
    snapshot_hash: str
    circuits_touched: dict[str, float] = field(default_factory=dict)  # circuit id -> activation
    timings: dict[str, float] = field(default_factory=dict)
    cache: str = "off"  # WaveGen: 'miss', the tier of an exact hit, 'semantic:<tier>', or 'off' (not consulted)
    draft_tokens: int = 0  # cached tokens offered as a draft
    accepted_tokens: int = 0  # of which the model accepted (all of them in 'jump' mode)
    coherence: float | None = None  # mean probability of the chosen tokens (None when nothing was computed)
    jumped: bool = False  # served from the cache without running the model (only where that is exact)


class Agent:
    """A handle on one registered agent; every call goes through the shared DynamicLoRA."""

    def __init__(self, dl: DynamicLoRA, agent_id: str) -> None:
        self.dl = dl
        self.id = agent_id

    @property
    def info(self):
        return self.dl.hierarchy.agent(self.id)

    def generate(
        self, prompt: str | list[int], mode: str | None = None, use_cache: bool | None = None, **overrides: Any
    ) -> GenerationResult:
        """Generate through WaveGen (``mode``: 'verify' or 'jump'; see WaveGenConfig). ``use_cache=False`` (or
        ``WaveGenConfig.enabled=False``) bypasses the cache. ``overrides`` replace generation config fields. The
        prompt is text, or the token ids the model reads."""
        if use_cache is None:
            use_cache = self.dl.config.wavegen.enabled
        if not use_cache:
            return self.dl.generate_batch([(self.id, prompt)], **overrides)[0]
        return self.dl.generate_cached([(self.id, prompt)], mode=mode, **overrides)[0]

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> GenerationResult:
        """The agent's reply to a conversation, through the tokenizer's chat template (``kwargs``: as generate)."""
        return self.generate(self.dl.runtime.chat_ids(messages), **kwargs)

    def learn(
        self,
        prompt: str | list[int] | None = None,
        completion: str | list[int] = "",
        critical: bool = False,
        *,
        messages: list[dict[str, str]] | None = None,
    ) -> LearnResult:
        """Gradient steps of the completion's next-token loss into this agent's context circuits only. The prompt
        is text, token ids, or (``messages=``) a conversation, learned as the model reads it through the chat
        template; ``completion`` is the reply the agent should have given (text, or its token ids)."""
        dl = self.dl
        dl.hierarchy.agent(self.id)
        if (prompt is None) == (messages is None):
            raise InvalidInputError("learn needs exactly one of prompt= (text or token ids) or messages=")
        prompt_ids = dl.runtime.chat_ids(messages) if messages is not None else dl.runtime.prompt_ids(prompt)
        completion_ids = (
            dl.encode(completion, special=False) if isinstance(completion, str) else dl.runtime.prompt_ids(completion)
        )
        if not completion_ids:
            raise InvalidInputError("the completion is empty after tokenization; give the text the agent should learn")
        if dl.tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [dl.tokenizer.eos_token_id]
        dl.check_length(len(prompt_ids) + len(completion_ids), len(prompt_ids), len(completion_ids))
        result = dl.learner.learn(self.id, prompt_ids, completion_ids, critical)
        dl.count_interactions(1)
        return result

    def forget(self, prompt: str | list[int] | None = None, *, messages: list[dict[str, str]] | None = None) -> dict:
        """Take back what this agent taught for a prompt (text, token ids, or ``messages=`` a conversation as the
        chat template renders it); see DynamicLoRA.forget."""
        if (prompt is None) == (messages is None):
            raise InvalidInputError("forget needs exactly one of prompt= (text or token ids) or messages=")
        return self.dl.forget(self.id, self.dl.runtime.chat_ids(messages) if messages is not None else prompt)

    def logits(self, input_ids: torch.Tensor, route_tokens: int | None = None) -> torch.Tensor:
        """Logits of token ids; ``route_tokens``: how many leading tokens are the prompt that routes (default all)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        return self.dl.forward([self.id] * input_ids.shape[0], input_ids, route_tokens=route_tokens)[0]

    def score(self, prompt: str, completion: str) -> float:
        """Sum of log-probabilities of the completion's tokens given the prompt."""
        p, c = self.dl.encode(prompt), self.dl.encode(completion, special=False)
        ids = torch.tensor([p + c])
        logp = self.logits(ids, route_tokens=len(p))[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:].to(logp.device)
        return float(logp[len(p) - 1 :].gather(-1, targets[len(p) - 1 :, None]).sum())

    def snapshot(self) -> Snapshot:
        return self.dl.snapshot(self.id)

    def __repr__(self) -> str:
        i = self.info
        return f"Agent(id={i.id!r}, swarm={i.swarm!r}, domain={i.domain!r})"
