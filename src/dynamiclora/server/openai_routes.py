"""OpenAI-compatible generation: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, each answered as
JSON or, with ``stream: true``, as server-sent events. ``model`` names the agent whose stack generates (or the base
model itself)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from .engine import GenerateJob
from .keys import Principal
from .protocol import APIError, chat_logprobs, legacy_logprobs, usage
from .scheduler import prompt_logprobs
from .schemas import ChatRequest, CompletionRequest, Sampling
from .service import Service, principal, service

log = logging.getLogger("dynamiclora.server")
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "JSON, or with "
                  "stream: true server-sent events, each `data: <a chunk as JSON>`, then `data: [DONE]`"}}  # fmt: skip

router = APIRouter()


@router.get("/v1/models")
async def models(who: Principal = Depends(principal), svc: Service = Depends(service)):
    agents = sorted(await svc.run(lambda: list(svc.dl.hierarchy.agents)))
    data = [{"id": svc.base, "object": "model", "created": 0, "owned_by": "dynamiclora"}]
    data += [
        {"id": a, "object": "model", "created": 0, "owned_by": "dynamiclora", "parent": svc.base, "root": svc.base}
        for a in agents
    ]
    return {"object": "list", "data": data}


@router.post("/v1/completions", responses=STREAMED)
async def completions(req: CompletionRequest, who: Principal = Depends(principal), svc: Service = Depends(service)):
    prompts = req.prompts()
    if req.stream and (len(prompts) > 1 or req.echo or req.logprobs is not None):
        raise APIError(400, "stream: give one prompt, no echo and no logprobs to stream", param="stream")
    jobs = [
        svc.job_for(req, prompt, who, req.max_tokens, req.logprobs, f"prompt[{i}]" if len(prompts) > 1 else "prompt")
        for i, prompt in enumerate(prompts)
    ]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    if req.stream:

        def piece(text: str, reason: str | None) -> dict:
            return {"choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

        return await stream(svc, jobs[0], head, piece, req)
    done = await asyncio.gather(*(svc.finish(job) for job in jobs))
    scored = []
    if req.echo and req.logprobs is not None:
        runtime = svc.dl.runtime
        scored = await asyncio.gather(
            *(
                svc.run(lambda j=j: prompt_logprobs(runtime, j.agent_id, j.prompt_ids, req.logprobs, j.base_only))
                for j in jobs
            )
        )
    choices, kept = [], []
    for i, (job, c) in enumerate(zip(jobs, done)):
        if job.max_tokens:
            kept.append(await svc.answered(rid if len(jobs) == 1 else f"{rid}/{i}", job, c))
        text = job.prompt + c.text if req.echo else c.text
        logprobs = None
        if req.logprobs is not None:
            entries = (scored[i] if req.echo else []) + (c.logprobs or [])
            logprobs = legacy_logprobs(entries, 0)
        choices.append({"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs})
    total = {k: sum(usage(c)[k] for c in done) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    body = {**head, "choices": choices, "usage": total, "cache": done[0].cache}
    if svc.learn_exchanges:
        body["learned"] = kept  # per choice: what was learned, or None
    return body


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat(req: ChatRequest, who: Principal = Depends(principal), svc: Service = Depends(service)):
    if req.stream and req.logprobs:
        raise APIError(400, "stream: logprobs are given only without streaming", param="stream")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    if not getattr(svc.dl.tokenizer, "chat_template", None):
        raise APIError(400, f"model {svc.base!r} has no chat template; use /v1/completions", param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    job = svc.job_for(req, svc.chat_ids(req.messages), who, max_tokens, top, "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "created": created, "model": req.model}
    if req.stream:

        def chunk(piece: str, reason: str | None) -> dict:
            delta = {"content": piece} if piece else {}
            return {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
            }

        return await stream(svc, job, {**head}, chunk, req)
    c = await svc.finish(job)
    kept = await svc.answered(rid, job, c)
    message = {"role": "assistant", "content": c.text}
    logprobs = chat_logprobs(c.logprobs or []) if req.logprobs else None
    body = {
        **head,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": c.finish_reason, "logprobs": logprobs}],
        "usage": usage(c),
    }
    if svc.learn_exchanges:
        body["learned"] = [kept]
    return body


async def stream(svc: Service, job: GenerateJob, head: dict, chunk, req: Sampling) -> StreamingResponse:
    """Server-sent events, one per decoded piece as the engine produces it; the last carries the finish reason
    (and usage when asked). A client that goes away cancels its row."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = asyncio.wrap_future(svc.engine.submit(job))  # a full queue answers 429 before the stream starts
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
            kept = await svc.answered(head["id"], job, c) if c.finish_reason != "cancelled" else None
            last = {**head, **chunk("", c.finish_reason)}
            if svc.learn_exchanges:
                last["learned"] = [kept]
            if (req.stream_options or {}).get("include_usage"):
                last["usage"] = usage(c)
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                job.cancelled.set()  # the client left: the row leaves the batch at the next step

    return StreamingResponse(events(), media_type="text/event-stream")
