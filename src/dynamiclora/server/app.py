"""The HTTP API: OpenAI-compatible completions for every agent, plus the memory's own endpoints.

``model`` names the agent whose stack generates (or the base model itself). Each agent has its own API key
(``Authorization: Bearer <key>``) and can generate with and learn into only its own tiers; the admin key
registers agents and runs ticks. Shared tiers change only through migration and consensus, never through a
request. Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, with 4xx for
everything a client can get wrong.

The routes live in three routers: generation (``openai_routes``), the memory (``memory_routes``) and the
dashboard (``dashboard``); what they share is a ``service.Service``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ..core import DynamicLoRA
from . import dashboard, memory_routes, openai_routes
from .engine import Engine
from .feedback import CompletionLog
from .keys import KeyStore
from .protocol import JSONBodies, document_api, install_error_handlers
from .service import Service


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
    engine = Engine(dl, state_dir, **engine_options)
    svc = Service(dl, engine, KeyStore(state_dir, admin_key), CompletionLog(state_dir), base_name(dl), learn_exchanges)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="DynamicLoRA", lifespan=lifespan)
    app.state.service = svc
    app.add_middleware(JSONBodies)
    install_error_handlers(app)
    for routes in (openai_routes, memory_routes, dashboard):
        app.include_router(routes.router)

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
