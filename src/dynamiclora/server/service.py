"""What every route shares: the memory, its engine thread, the keys and the completion log, plus the two
dependencies that say who is calling (``principal``) and that the caller holds the admin key (``admin``).

Routes reach the service through ``Depends(service)``; all work on the memory runs on the engine thread
(``Service.run``), so requests never touch the model from the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Depends, Request

from ..core import DynamicLoRA
from ..errors import DynamicLoRAError, PromptTooLongError
from .engine import Completion, Engine, GenerateJob
from .feedback import CompletionLog, Exchange
from .keys import KeyStore, Principal
from .protocol import APIError
from .schemas import Sampling

DEFAULT_MAX_TOKENS = 64


@dataclass
class Service:
    dl: DynamicLoRA
    engine: Engine
    keys: KeyStore
    given: CompletionLog  # what was answered, for feedback
    base: str  # the base model's name, served as a model of its own
    learn_exchanges: bool  # learn every reply an agent finishes by itself

    async def run(self, fn, durable: bool = False, waits_for: frozenset[str] | None = frozenset()):
        """``fn`` on the engine thread; ``waits_for``: whose running rows it must wait for (see Engine.call)."""
        return await asyncio.wrap_future(self.engine.call(fn, durable, waits_for))

    def agent_for(self, model: str, who: Principal, param: str = "model") -> str:
        if model not in self.dl.hierarchy.agents:
            raise APIError(404, f"unknown agent {model!r}: register it with POST /v1/agents", param=param)
        if not who.may_act_as(model):
            raise APIError(403, f"this key belongs to {who.agent!r}, not to {model!r}", "permission_error", param)
        return model

    def scoped(self, who: Principal, agent: str | None) -> str | None:
        """The agent a listing is about: the one asked for, else the key's own (None: all, for the admin key)."""
        if agent is not None:
            return self.agent_for(agent, who, "agent")
        return None if who.admin else who.agent

    def chat_ids(self, messages) -> list[int]:
        """The token ids the model reads for a conversation (the chat template, the assistant's turn opened)."""
        try:
            return self.dl.runtime.chat_ids([{"role": m.role, "content": m.content} for m in messages])
        except DynamicLoRAError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - a template may reject a message order
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None

    def job_for(
        self,
        req: Sampling,
        prompt: str | list[int],
        who: Principal,
        max_tokens: int | None,
        logprobs: int | None = None,
        param: str = "prompt",
    ) -> GenerateJob:
        """A generation job for one prompt (text or token ids), checked against the model's context."""
        dl = self.dl
        if req.model == self.base:
            agent_id = who.agent or next(iter(sorted(dl.hierarchy.agents)), None)
            if agent_id is None:
                raise APIError(400, "no agent is registered yet; the base model runs under an agent's key")
            base_only = True
        else:
            agent_id, base_only = self.agent_for(req.model, who), False
        tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if isinstance(prompt, str):
            text, prompt_ids = prompt, dl.encode(prompt)
        else:
            vocab = len(dl.tokenizer)
            bad = next((t for t in prompt if t >= vocab), None)
            if bad is not None:
                message = f"{param}: token id {bad} is outside the vocabulary (0 to {vocab - 1})"
                raise APIError(400, message, param=param)
            text, prompt_ids = dl.tokenizer.decode(prompt), list(prompt)
        if not prompt_ids:
            raise APIError(400, f"{param}: empty after tokenization; give at least one token of text", param=param)
        try:
            dl.check_length(len(prompt_ids) + tokens, len(prompt_ids), tokens)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param="max_tokens") from None
        return GenerateJob(
            agent_id, text, prompt_ids, tokens, req.temperature, req.top_p, base_only, req.stops(), logprobs, req.seed
        )

    async def finish(self, job: GenerateJob) -> Completion:
        if job.max_tokens == 0:  # scoring only: nothing to generate
            return Completion("", len(job.prompt_ids), 0, "length")
        return await asyncio.wrap_future(self.engine.submit(job))

    async def answered(self, exchange_id: str, job: GenerateJob, c: Completion) -> dict | None:
        """Keep an exchange for feedback; with ``learn_exchanges``, learn a reply the agent finished by itself
        (saved before the answer). Returns what was learned, or None."""
        exchange = Exchange(exchange_id, job.agent_id, job.prompt_ids, c.text, c.reply_ids)
        self.given.record(exchange)
        if not (self.learn_exchanges and not job.base_only and c.finish_reason == "stop" and c.text.strip()):
            return None
        return await self.learn_into(job.agent_id, job.prompt_ids, exchange.reply)

    async def learn_into(self, agent_id: str, prompt, completion, critical: bool = False) -> dict:
        """Learn into the agent's context tier on the engine thread, once its rows are done; saved before the
        answer. Returns what was learned."""
        r = await self.run(
            lambda: self.dl.agent(agent_id).learn(prompt, completion, critical),
            durable=True,
            waits_for=frozenset({agent_id}),
        )
        return {
            "agent": agent_id,
            "circuit": r.circuit_id,
            "spawned": r.spawned,
            "trained": r.trained,
            "loss_before": r.loss_before,
            "loss_after": r.loss_after,
            "interaction": self.dl.interactions,
            "saved": True,
        }


def service(request: Request) -> Service:
    return request.app.state.service


def principal(request: Request, svc: Service = Depends(service)) -> Principal:
    """Who is calling, from ``Authorization: Bearer <key>``."""
    header = request.headers.get("authorization", "")
    if not header:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
    scheme, _, key = header.partition(" ")
    who = svc.keys.resolve(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if who is None:
        raise APIError(401, "invalid API key", "authentication_error")
    return who


def admin(who: Principal = Depends(principal)) -> Principal:
    if not who.admin:
        raise APIError(403, "this needs the admin key", "permission_error")
    return who


__all__ = ["DEFAULT_MAX_TOKENS", "Service", "admin", "principal", "service"]
