"""The HTTP API: OpenAI-compatible completions for every agent, plus the memory's own endpoints.

``model`` names the agent whose stack generates (or the base model itself). Each agent has its own API key
(``Authorization: Bearer <key>``) and can generate with and learn into only its own tiers; the admin key
registers agents and runs ticks. Shared tiers change only through migration and consensus, never through a
request. Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, with 4xx for
everything a client can get wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from ..core import DynamicLoRA
from ..errors import DynamicLoRAError, PromptTooLongError, RegistrationError
from ..forgetting import OWN_TIERS
from . import dashboard
from .engine import Completion, Engine, GenerateJob
from .feedback import KEEP, CompletionLog, Exchange
from .keys import KeyStore, Principal
from .protocol import (
    APIError,
    JSONBodies,
    chat_logprobs,
    document_api,
    install_error_handlers,
    legacy_logprobs,
    usage,
)
from .scheduler import prompt_logprobs
from .schemas import (
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    ForgetRequest,
    LearnRequest,
    RegisterRequest,
    Sampling,
)

log = logging.getLogger("dynamiclora.server")
DEFAULT_MAX_TOKENS = 64
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "JSON, or with "
                  "stream: true server-sent events, each `data: <a chunk as JSON>`, then `data: [DONE]`"}}  # fmt: skip


def base_name(dl: DynamicLoRA) -> str:
    path = str(getattr(dl.model.config, "_name_or_path", "") or "")
    return Path(path).name or "base"


def create_app(
    dl: DynamicLoRA,
    state_dir: str | Path,
    admin_key: str | None = None,
    learn_exchanges: bool = False,
    **engine_options: Any,
) -> FastAPI:
    """The app around ``dl``, saving to ``state_dir`` (``engine_options``: see server.engine.Engine).

    ``learn_exchanges``: every reply an agent finishes by itself (``finish_reason: "stop"``) is learned into its
    context tier, as the model read the prompt, before the answer is sent (as accepted feedback would)."""
    state_dir = Path(state_dir)
    keys = KeyStore(state_dir, admin_key)
    given = CompletionLog(state_dir)  # what was answered, for feedback
    engine = Engine(dl, state_dir, **engine_options)
    base = base_name(dl)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="DynamicLoRA", lifespan=lifespan)
    app.state.engine, app.state.keys, app.state.dl = engine, keys, dl
    app.add_middleware(JSONBodies)
    install_error_handlers(app)

    # -- auth -----------------------------------------------------------------------------------------
    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        scheme, _, key = header.partition(" ")
        who = keys.resolve(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if who is None:
            raise APIError(401, "invalid API key", "authentication_error")
        return who

    def admin(who: Principal = Depends(principal)) -> Principal:
        if not who.admin:
            raise APIError(403, "this needs the admin key", "permission_error")
        return who

    async def run(fn, durable: bool = False, waits_for: frozenset[str] | None = frozenset()):
        """``fn`` on the engine thread; ``waits_for``: whose running rows it must wait for (see Engine.call)."""
        return await asyncio.wrap_future(engine.call(fn, durable, waits_for))

    def agent_for(model: str, who: Principal, param: str = "model") -> str:
        if model not in dl.hierarchy.agents:
            raise APIError(404, f"unknown agent {model!r}: register it with POST /v1/agents", param=param)
        if not who.may_act_as(model):
            raise APIError(403, f"this key belongs to {who.agent!r}, not to {model!r}", "permission_error", param)
        return model

    # -- OpenAI-compatible ----------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(who: Principal = Depends(principal)):
        agents = sorted(await run(lambda: list(dl.hierarchy.agents)))
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "dynamiclora"}]
        data += [
            {"id": a, "object": "model", "created": 0, "owned_by": "dynamiclora", "parent": base, "root": base}
            for a in agents
        ]
        return {"object": "list", "data": data}

    def job_for(
        req: Sampling,
        prompt: str | list[int],
        who: Principal,
        max_tokens: int | None,
        logprobs: int | None = None,
        param: str = "prompt",
    ) -> GenerateJob:
        """A generation job for one prompt (text or token ids), checked against the model's context."""
        if req.model == base:
            agent_id = who.agent or next(iter(sorted(dl.hierarchy.agents)), None)
            if agent_id is None:
                raise APIError(400, "no agent is registered yet; the base model runs under an agent's key")
            base_only = True
        else:
            agent_id, base_only = agent_for(req.model, who), False
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

    async def answered(exchange_id: str, job: GenerateJob, c: Completion) -> dict | None:
        """Keep an exchange for feedback; with ``learn_exchanges``, learn a reply the agent finished by itself
        (saved before the answer). Returns what was learned, or None."""
        exchange = Exchange(exchange_id, job.agent_id, job.prompt_ids, c.text, c.reply_ids)
        given.record(exchange)
        if not (learn_exchanges and not job.base_only and c.finish_reason == "stop" and c.text.strip()):
            return None
        return await learn_into(job.agent_id, job.prompt_ids, exchange.reply)

    async def finish(job: GenerateJob) -> Completion:
        if job.max_tokens == 0:  # scoring only: nothing to generate
            return Completion("", len(job.prompt_ids), 0, "length")
        return await asyncio.wrap_future(engine.submit(job))

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(req: CompletionRequest, who: Principal = Depends(principal)):
        prompts = req.prompts()
        if req.stream and (len(prompts) > 1 or req.echo or req.logprobs is not None):
            raise APIError(400, "stream: give one prompt, no echo and no logprobs to stream", param="stream")
        jobs = [
            job_for(req, prompt, who, req.max_tokens, req.logprobs, f"prompt[{i}]" if len(prompts) > 1 else "prompt")
            for i, prompt in enumerate(prompts)
        ]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
        if req.stream:

            def piece(text: str, reason: str | None) -> dict:
                return {"choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

            return await stream(jobs[0], head, piece, req)
        done = await asyncio.gather(*(finish(job) for job in jobs))
        scored = []
        if req.echo and req.logprobs is not None:
            scored = await asyncio.gather(
                *(
                    run(lambda j=j: prompt_logprobs(dl.runtime, j.agent_id, j.prompt_ids, req.logprobs, j.base_only))
                    for j in jobs
                )
            )
        choices, kept = [], []
        for i, (job, c) in enumerate(zip(jobs, done)):
            if job.max_tokens:
                kept.append(await answered(rid if len(jobs) == 1 else f"{rid}/{i}", job, c))
            text = job.prompt + c.text if req.echo else c.text
            logprobs = None
            if req.logprobs is not None:
                entries = (scored[i] if req.echo else []) + (c.logprobs or [])
                logprobs = legacy_logprobs(entries, 0)
            choices.append({"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs})
        total = {k: sum(usage(c)[k] for c in done) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        body = {**head, "choices": choices, "usage": total, "cache": done[0].cache}
        if learn_exchanges:
            body["learned"] = kept  # per choice: what was learned, or None
        return body

    def chat_ids(messages) -> list[int]:
        """The token ids the model reads for a conversation (the chat template, the assistant's turn opened)."""
        try:
            return dl.runtime.chat_ids([{"role": m.role, "content": m.content} for m in messages])
        except DynamicLoRAError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - a template may reject a message order
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat(req: ChatRequest, who: Principal = Depends(principal)):
        if req.stream and req.logprobs:
            raise APIError(400, "stream: logprobs are given only without streaming", param="stream")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        template = getattr(dl.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, f"model {base!r} has no chat template; use /v1/completions", param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = job_for(req, chat_ids(req.messages), who, max_tokens, top, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": req.model}
        if req.stream:

            def chunk(piece: str, reason: str | None) -> dict:
                delta = {"content": piece} if piece else {}
                return {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
                }

            return await stream(job, {**head}, chunk, req)
        c = await finish(job)
        kept = await answered(rid, job, c)
        message = {"role": "assistant", "content": c.text}
        logprobs = chat_logprobs(c.logprobs or []) if req.logprobs else None
        body = {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": c.finish_reason, "logprobs": logprobs}],
            "usage": usage(c),
        }
        if learn_exchanges:
            body["learned"] = [kept]
        return body

    async def stream(job: GenerateJob, head: dict, chunk, req: Sampling) -> StreamingResponse:
        """Server-sent events, one per decoded piece as the engine produces it; the last carries the finish reason
        (and usage when asked). A client that goes away cancels its row."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        future = asyncio.wrap_future(engine.submit(job))  # a full queue answers 429 before the stream starts
        future.add_done_callback(lambda _: pieces.put_nowait(None))

        async def events() -> AsyncIterator[str]:
            try:
                while (piece := await pieces.get()) is not None:
                    yield f"data: {json.dumps({**head, **chunk(piece, None)})}\n\n"
                try:
                    c = future.result()
                except Exception as e:  # noqa: BLE001 - the stream has started: report it in the stream
                    log.exception("generation failed during a stream")
                    error = {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                kept = await answered(head["id"], job, c) if c.finish_reason != "cancelled" else None
                last = {**head, **chunk("", c.finish_reason)}
                if learn_exchanges:
                    last["learned"] = [kept]
                if (req.stream_options or {}).get("include_usage"):
                    last["usage"] = usage(c)
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not future.done():
                    job.cancelled.set()  # the client left: the row leaves the batch at the next step

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- the memory's own endpoints ---------------------------------------------------------------------
    @app.post("/v1/agents", status_code=201)
    async def register(req: RegisterRequest, who: Principal = Depends(admin)):
        def create() -> dict:  # on the engine thread: check, register, save, then issue the key, as one step
            if req.id in dl.hierarchy.agents and keys.has_key(req.id):
                raise APIError(409, f"agent {req.id!r} already exists", "conflict_error", "id")
            if req.id == base:
                raise APIError(409, f"{req.id!r} is the base model's name", "conflict_error", "id")
            info = dl.agent(req.id, swarm=req.swarm, domain=req.domain).info
            engine.save()
            return {"id": info.id, "swarm": info.swarm, "domain": info.domain, "api_key": keys.issue(req.id)}

        try:
            return await run(create)
        except RegistrationError as e:
            kind = "conflict_error" if e.conflict else "invalid_request_error"
            raise APIError(409 if e.conflict else 400, str(e), kind, e.field) from None

    @app.delete("/v1/agents/{agent_id}")
    async def delete_agent(agent_id: str, who: Principal = Depends(principal)):
        """Forget an agent (the admin key, or the agent's own): its key first, then its tiers, cache entries,
        requests and the shared-gate keys only it put there, saved before the answer. Shared deltas it is part of
        are listed under ``not_separable``."""
        agent_for(agent_id, who, "agent_id")

        def forget() -> dict:
            if agent_id not in dl.hierarchy.agents:  # deleted by a request just before this one
                raise APIError(404, f"unknown agent {agent_id!r}", "not_found_error", "agent_id")
            keys.revoke(agent_id)  # first: a crash before the save leaves an agent without a key, never a stray key
            report = dl.delete_agent(agent_id)
            report["completions_forgotten"] = given.forget_agent(agent_id)
            return report

        report = await run(forget, durable=True, waits_for=frozenset({agent_id}))
        return {**report, "deleted": True, "saved": True}

    @app.delete("/v1/circuits/{circuit_id}")
    async def delete_circuit(circuit_id: str, who: Principal = Depends(principal)):
        """Remove one learned circuit: an agent's key may remove those of its own agent and context tiers, the admin
        key any (a shared one changes every member's stack)."""

        def remove() -> dict:
            try:
                scope, _ = dl.hierarchy.find_circuit(circuit_id)
            except KeyError:
                raise APIError(404, f"no circuit has id {circuit_id!r}", "not_found_error", "circuit_id") from None
            if not who.admin and not (scope.key.tier in OWN_TIERS and scope.key.name == who.agent):
                message = f"circuit {circuit_id!r} is in {scope.key}, not in this key's agent or context tier"
                raise APIError(403, message, "permission_error", "circuit_id")
            return dl.remove_circuit(circuit_id)

        record = await run(remove, durable=True, waits_for=None)
        return {"removed": record["id"], "scope": f"{record['tier']}:{record['scope']}", "saved": True}

    @app.post("/v1/learn")
    async def learn(req: LearnRequest, who: Principal = Depends(principal)):
        agent_id = agent_for(req.model, who)
        prompt = req.prompt if req.messages is None else chat_ids(req.messages)  # as the model reads it
        try:
            return await learn_into(agent_id, prompt, req.completion, req.critical)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def learn_into(agent_id: str, prompt, completion, critical: bool = False) -> dict:
        """Learn into the agent's context tier on the engine thread, once its rows are done; saved before the
        answer. Returns what was learned."""
        r = await run(
            lambda: dl.agent(agent_id).learn(prompt, completion, critical),
            durable=True,
            waits_for=frozenset({agent_id}),
        )
        return learned(agent_id, r)

    @app.post("/v1/forget")
    async def forget(req: ForgetRequest, who: Principal = Depends(principal)):
        """Take back what the agent taught for one prompt (its gate keys there; shared keys only it put there),
        saved before the answer; what cannot be separated is listed under ``not_separable``."""
        agent_id = agent_for(req.model, who)
        prompt = req.prompt if req.messages is None else chat_ids(req.messages)
        report = await run(lambda: dl.forget(agent_id, prompt), durable=True, waits_for=frozenset({agent_id}))
        return {**report, "saved": True}

    def learned(agent_id: str, r) -> dict:
        return {
            "agent": agent_id,
            "circuit": r.circuit_id,
            "spawned": r.spawned,
            "trained": r.trained,
            "loss_before": r.loss_before,
            "loss_after": r.loss_after,
            "interaction": dl.interactions,
            "saved": True,
        }

    @app.post("/v1/feedback")
    async def feedback(req: FeedbackRequest, who: Principal = Depends(principal)):
        """Confirm (``accepted: true``) or correct a completion by its id: the exchange is learned into that
        agent's context tier, as the model read the prompt; answered once saved."""
        exchange = given.find(req.id)
        if exchange is None:
            message = f"unknown completion id {req.id!r} (the server keeps its latest {KEEP:,} completions)"
            raise APIError(404, message, "not_found_error", "id")
        if not who.may_act_as(exchange.agent):
            raise APIError(
                403, f"completion {req.id!r} was {exchange.agent!r}'s, not this key's", "permission_error", "id"
            )
        if exchange.agent not in dl.hierarchy.agents:
            raise APIError(404, f"agent {exchange.agent!r} no longer exists", "not_found_error", "id")
        completion = exchange.reply if req.accepted else req.correction
        if req.accepted and not exchange.text.strip():
            raise APIError(
                400, "accepted: the reply was empty, there is nothing to learn; send a correction", param="accepted"
            )
        if not req.accepted and not req.correction.strip():
            raise APIError(
                400, "correction: only white space; give the reply the agent should have given", param="correction"
            )
        done = await learn_into(exchange.agent, exchange.prompt_ids, completion)
        return {**done, "id": req.id, "feedback": "accepted" if req.accepted else "corrected"}

    @app.post("/v1/tick")
    async def tick(who: Principal = Depends(admin)):
        report = await run(dl.tick, durable=True, waits_for=None)
        return {
            "tick": report.tick,
            "transitions": len(report.transitions),
            "migrated": report.migrated,
            "forgotten": report.forgotten,
            "shared": report.shared,
            "consolidated": report.consolidated,
        }

    def scoped(who: Principal, agent: str | None) -> str | None:
        if agent is not None:
            return agent_for(agent, who, "agent")
        return None if who.admin else who.agent

    @app.get("/v1/circuits")
    async def circuits(agent: str | None = None, who: Principal = Depends(principal)):
        target = scoped(who, agent)
        return {"data": await run(lambda: dl.circuits(agent=target))}

    @app.get("/v1/migrations")
    async def migrations(agent: str | None = None, who: Principal = Depends(principal)):
        target = scoped(who, agent)
        return {"data": await run(lambda: dl.migrations(agent=target))}

    @app.get("/v1/timescales")
    async def timescales(who: Principal = Depends(principal)):
        return await run(dl.timescales)

    @app.get("/v1/cache")
    async def cache(who: Principal = Depends(principal)):
        return await run(dl.wavegen.statistics)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "base": base,
            "agents": len(dl.hierarchy.agents),
            "tick": dl.tick_count,
            "interactions": dl.interactions,
            "queue": engine.queue.qsize(),
            "engine": dict(engine.stats),
            "batch": engine.live(),
        }

    # -- the dashboard --------------------------------------------------------------------------------
    def dashboard_key(request: Request) -> None:
        key = request.query_params.get("key", "")
        who = keys.resolve(key) if key else None
        if who is None or not who.admin:
            raise APIError(401, "the dashboard's data needs the admin key (?key=...)", "authentication_error")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return dashboard.PAGE

    @app.get("/dashboard/data", dependencies=[Depends(dashboard_key)])
    async def dashboard_data():
        return await run(lambda: {**dashboard.data(dl), "batch": engine.live()})

    @app.get("/dashboard/plot/{name}.png", dependencies=[Depends(dashboard_key)])
    async def dashboard_plot(name: str):
        if name not in dashboard.PLOTS:
            raise APIError(404, f"no plot {name!r}; choose from {sorted(dashboard.PLOTS)}", "not_found_error")
        snapshot = await run(lambda: dashboard.data(dl))
        png = await asyncio.to_thread(dashboard.PLOTS[name], snapshot)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    context = dl.runtime.max_positions
    limits = {"vocabulary": len(dl.tokenizer) - 1, "context": None if context is None else context - 1}
    app.openapi = lambda: document_api(app, limits)  # type: ignore[method-assign]
    return app


def open_state(state_dir: Path, model: str | None = None) -> DynamicLoRA:
    """The saved state in ``state_dir`` if there is one, else a fresh one on ``model`` (default: built-in)."""
    from ..store import DB_NAME

    if (state_dir / DB_NAME).exists():
        return DynamicLoRA.load(state_dir)
    dl = DynamicLoRA.from_pretrained(model) if model else DynamicLoRA.default()
    dl.save(state_dir)
    return dl


__all__ = ["base_name", "create_app", "open_state"]
