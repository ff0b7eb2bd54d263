"""The HTTP conventions of the API: OpenAI's error shape and response shapes, JSON bodies, the OpenAPI document.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with 4xx for everything a client can get wrong;
bodies are read as JSON whatever their content type says; ``/openapi.json`` states the codes really answered.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Busy
from .scheduler import Completion

log = logging.getLogger("dynamiclora.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class JSONBodies:
    """Every body of this API is JSON: a request that names no content type, or curl's default form type for
    ``-d``, is read as JSON (``curl … -d '{"id": "ana"}'`` works as written; a body that is not JSON is a 400)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            given = dict(scope["headers"]).get(b"content-type", b"")
            if not given or given.startswith(b"application/x-www-form-urlencoded"):
                given = b"application/json"
            scope = {**scope, "headers": [*headers, (b"content-type", given)]}
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure in the error shape: APIError as raised, bad bodies 400 naming the field, a full queue 429."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error")
        loc = []
        for part in first.get("loc", ())[1:]:  # after "body"; stop at pydantic's names of union members
            if isinstance(part, str) and not part.isidentifier():
                break
            loc.append(str(part))
        field = ".".join(loc) or "body"
        msg = first.get("msg", "invalid value")
        return error_response(400, f"{field}: {msg}", "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        detail = str(e.detail)
        if detail == "There was an error parsing the body":
            detail = "the body could not be parsed: send JSON encoded as UTF-8"
        return error_response(e.status_code, detail, kind, headers=e.headers)  # a 405 keeps its Allow

    @app.exception_handler(Busy)
    async def busy(request: Request, e: Busy):
        return error_response(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def _state_limits(node, limits: dict[str, int | None]) -> None:
    if isinstance(node, dict):
        name = node.pop("x-model-limit", None)
        if name is not None and limits.get(name) is not None:
            node["maximum"] = min(node.get("maximum", limits[name]), limits[name])
        for value in node.values():
            _state_limits(value, limits)
    elif isinstance(node, list):
        for value in node:
            _state_limits(value, limits)


def usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def legacy_logprobs(entries: list[dict | None], offset: int) -> dict:
    """OpenAI's legacy completions shape: parallel lists over the returned tokens."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(e["token"] if e else "")
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] if e else None for e in entries],
        "top_logprobs": [dict(e.get("top", [])) if e else None for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[dict]) -> dict:
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e.get("top", [])]}
            for e in entries
        ]
    }


ERRORS = {
    "400": "invalid request: the field is named in error.param and in the message",
    "401": "missing or invalid API key",
    "403": "this key may not act as this agent, or the call needs the admin key",
    "404": "unknown agent (or plot)",
    "409": "the agent exists, or its swarm lives in another domain",
    "429": "the request queue is full: retry after Retry-After seconds",
}


def document_api(app: FastAPI, limits: dict[str, int | None]) -> dict:
    """The OpenAPI document as the API is served: bad bodies are 400, not FastAPI's 422; every /v1 route lists the
    errors it can give, in the OpenAI error shape; and bounds that depend on the served model (``limits``: the
    largest value of each ``x-model-limit`` field, e.g. ``{"context": 255, "vocabulary": 49151}``) are stated."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _state_limits(schema, limits)
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["integer", "null"]},
                },
            }
        },
    }
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            codes = ERRORS if path.startswith("/v1/") or path.startswith("/dashboard/") else {"400": ERRORS["400"]}
            for code, description in codes.items():
                responses.setdefault(code, {"description": description, **error})
    schema["components"]["schemas"].pop("HTTPValidationError", None)  # FastAPI's 422 body, never answered
    schema["components"]["schemas"].pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
