"""The memory's own endpoints: register and delete agents, learn, forget, give feedback, run a tick, remove a
circuit, and read the memory (circuits, migrations, timescales, the cache, health).

An agent's key acts on its own tiers only; shared tiers change only through migration and consensus (a tick, with
the admin key), never through a request. Every write is saved before it is answered."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..errors import PromptTooLongError, RegistrationError
from ..forgetting import OWN_TIERS
from .feedback import KEEP
from .keys import Principal
from .protocol import APIError
from .schemas import FeedbackRequest, ForgetRequest, LearnRequest, RegisterRequest
from .service import Service, admin, principal, service

router = APIRouter()


@router.post("/v1/agents", status_code=201)
async def register(req: RegisterRequest, who: Principal = Depends(admin), svc: Service = Depends(service)):
    dl, keys = svc.dl, svc.keys

    def create() -> dict:  # on the engine thread: check, register, save, then issue the key, as one step
        if req.id in dl.hierarchy.agents and keys.has_key(req.id):
            raise APIError(409, f"agent {req.id!r} already exists", "conflict_error", "id")
        if req.id == svc.base:
            raise APIError(409, f"{req.id!r} is the base model's name", "conflict_error", "id")
        info = dl.agent(req.id, swarm=req.swarm, domain=req.domain).info
        svc.engine.save()
        return {"id": info.id, "swarm": info.swarm, "domain": info.domain, "api_key": keys.issue(req.id)}

    try:
        return await svc.run(create)
    except RegistrationError as e:
        kind = "conflict_error" if e.conflict else "invalid_request_error"
        raise APIError(409 if e.conflict else 400, str(e), kind, e.field) from None


@router.delete("/v1/agents/{agent_id}")
async def delete_agent(agent_id: str, who: Principal = Depends(principal), svc: Service = Depends(service)):
    """Forget an agent (the admin key, or the agent's own): its key first, then its tiers, cache entries,
    requests and the shared-gate keys only it put there, saved before the answer. Shared deltas it is part of
    are listed under ``not_separable``."""
    svc.agent_for(agent_id, who, "agent_id")
    dl = svc.dl

    def forget() -> dict:
        if agent_id not in dl.hierarchy.agents:  # deleted by a request just before this one
            raise APIError(404, f"unknown agent {agent_id!r}", "not_found_error", "agent_id")
        svc.keys.revoke(agent_id)  # first: a crash before the save leaves an agent without a key, never a stray key
        report = dl.delete_agent(agent_id)
        report["completions_forgotten"] = svc.given.forget_agent(agent_id)
        return report

    report = await svc.run(forget, durable=True, waits_for=frozenset({agent_id}))
    return {**report, "deleted": True, "saved": True}


@router.delete("/v1/circuits/{circuit_id}")
async def delete_circuit(circuit_id: str, who: Principal = Depends(principal), svc: Service = Depends(service)):
    """Remove one learned circuit: an agent's key may remove those of its own agent and context tiers, the admin
    key any (a shared one changes every member's stack)."""
    dl = svc.dl

    def remove() -> dict:
        try:
            scope, _ = dl.hierarchy.find_circuit(circuit_id)
        except KeyError:
            raise APIError(404, f"no circuit has id {circuit_id!r}", "not_found_error", "circuit_id") from None
        if not who.admin and not (scope.key.tier in OWN_TIERS and scope.key.name == who.agent):
            message = f"circuit {circuit_id!r} is in {scope.key}, not in this key's agent or context tier"
            raise APIError(403, message, "permission_error", "circuit_id")
        return dl.remove_circuit(circuit_id)

    record = await svc.run(remove, durable=True, waits_for=None)
    return {"removed": record["id"], "scope": f"{record['tier']}:{record['scope']}", "saved": True}


@router.post("/v1/learn")
async def learn(req: LearnRequest, who: Principal = Depends(principal), svc: Service = Depends(service)):
    agent_id = svc.agent_for(req.model, who)
    prompt = req.prompt if req.messages is None else svc.chat_ids(req.messages)  # as the model reads it
    try:
        return await svc.learn_into(agent_id, prompt, req.completion, req.critical)
    except PromptTooLongError as e:
        raise APIError(400, str(e), param="prompt") from None


@router.post("/v1/forget")
async def forget(req: ForgetRequest, who: Principal = Depends(principal), svc: Service = Depends(service)):
    """Take back what the agent taught for one prompt (its gate keys there; shared keys only it put there),
    saved before the answer; what cannot be separated is listed under ``not_separable``."""
    agent_id = svc.agent_for(req.model, who)
    prompt = req.prompt if req.messages is None else svc.chat_ids(req.messages)
    report = await svc.run(lambda: svc.dl.forget(agent_id, prompt), durable=True, waits_for=frozenset({agent_id}))
    return {**report, "saved": True}


@router.post("/v1/feedback")
async def feedback(req: FeedbackRequest, who: Principal = Depends(principal), svc: Service = Depends(service)):
    """Confirm (``accepted: true``) or correct a completion by its id: the exchange is learned into that
    agent's context tier, as the model read the prompt; answered once saved."""
    exchange = svc.given.find(req.id)
    if exchange is None:
        message = f"unknown completion id {req.id!r} (the server keeps its latest {KEEP:,} completions)"
        raise APIError(404, message, "not_found_error", "id")
    if not who.may_act_as(exchange.agent):
        message = f"completion {req.id!r} was {exchange.agent!r}'s, not this key's"
        raise APIError(403, message, "permission_error", "id")
    if exchange.agent not in svc.dl.hierarchy.agents:
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
    done = await svc.learn_into(exchange.agent, exchange.prompt_ids, completion)
    return {**done, "id": req.id, "feedback": "accepted" if req.accepted else "corrected"}


@router.post("/v1/tick")
async def tick(who: Principal = Depends(admin), svc: Service = Depends(service)):
    report = await svc.run(svc.dl.tick, durable=True, waits_for=None)
    return {
        "tick": report.tick,
        "transitions": len(report.transitions),
        "migrated": report.migrated,
        "forgotten": report.forgotten,
        "shared": report.shared,
        "consolidated": report.consolidated,
    }


@router.get("/v1/circuits")
async def circuits(agent: str | None = None, who: Principal = Depends(principal), svc: Service = Depends(service)):
    target = svc.scoped(who, agent)
    return {"data": await svc.run(lambda: svc.dl.circuits(agent=target))}


@router.get("/v1/migrations")
async def migrations(agent: str | None = None, who: Principal = Depends(principal), svc: Service = Depends(service)):
    target = svc.scoped(who, agent)
    return {"data": await svc.run(lambda: svc.dl.migrations(agent=target))}


@router.get("/v1/timescales")
async def timescales(who: Principal = Depends(principal), svc: Service = Depends(service)):
    return await svc.run(svc.dl.timescales)


@router.get("/v1/cache")
async def cache(who: Principal = Depends(principal), svc: Service = Depends(service)):
    return await svc.run(svc.dl.wavegen.statistics)


@router.get("/health")
async def health(svc: Service = Depends(service)):
    dl, engine = svc.dl, svc.engine
    return {
        "status": "ok",
        "base": svc.base,
        "agents": len(dl.hierarchy.agents),
        "tick": dl.tick_count,
        "interactions": dl.interactions,
        "queue": engine.queue.qsize(),
        "engine": dict(engine.stats),
        "batch": engine.live(),
    }
