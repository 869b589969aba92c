"""The FastAPI app: OpenAI-compatible endpoints over an :class:`EngineLoop`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream as
server-sent events ending in ``data: [DONE]`` when ``stream`` is true),
``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /load`` (the scheduler's load estimate for a router, with queue
and KV counts).

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``):
malformed JSON 400, a body of the wrong shape or types 422, a bad value 400, an
unknown model 404, a prompt that does not fit the context 413, a missing or wrong
API key 401, a full queue 429 with ``Retry-After``, draining for shutdown 503.

A request with ``n`` choices, or a completions request with a batch of prompts, is
one engine request per choice; choice ``p * n + j`` is prompt ``p``'s ``j``-th.

This module only assembles the app (lifespan, error handlers, the API-key check, the
routes); the handlers are in :mod:`fbjax.serve.routes`, the shared state in
:mod:`fbjax.serve.state`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fbjax.serve.metrics import ServerMetrics
from fbjax.serve.routes import ROUTERS
from fbjax.serve.state import (
    ServerSettings,
    ServerState,
    app_state,
    attach,
    load_snapshot,
    state_of,
)
from fbjax.web.errors import OpenAIError
from fbjax.web.limits import BodyLimitMiddleware

# What other modules import from here.
__all__ = ["ServerSettings", "ServerState", "build_app", "load_snapshot"]

log = logging.getLogger(__name__)


def build_app(state: ServerState) -> FastAPI:
    """The app serving ``state``'s engine; its lifespan runs the engine thread."""
    app = FastAPI(title="fbjax", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible server over the fbjax engine")
    attach(app, state)
    if state.settings.api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=state.settings.api_key,
                           metrics=state.metrics)
    # Added last, so it runs first: an oversized body is refused before anything reads it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.limits.max_body_bytes,
                       on_reject=lambda status: state.metrics.rejected.labels(str(status)).inc())
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    for router in ROUTERS:
        app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app_state(app)
    state.loop.start(asyncio.get_running_loop())
    if state.address is not None:
        log.info("listening on %s (model %r, scheduler %s)", state.address,
                 state.settings.model_name, state.engine.scheduler.name)
    yield
    state.loop.stop()


# ----------------------------------------------------------------------------- errors


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    state_of(request).metrics.rejected.labels(str(exc.status)).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as an OpenAI error; a body that is not JSON at all is a 400."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        err = OpenAIError(400, "the request body is not valid JSON", None, "invalid_json")
    else:
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}"
                           f": {e.get('msg')}" for e in errors[:5])
        err = OpenAIError(422, f"invalid request: {detail}", ".".join(loc) or None,
                          "invalid_type")
    return await _openai_error(request, err)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405, a body over the
    limit 413) as OpenAI errors."""
    return await _openai_error(request, OpenAIError(exc.status_code, str(exc.detail)))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug is a 500 in OpenAI's format, counted, with the traceback in the log."""
    log.error("internal error on %s %s", request.method, request.url.path,
              exc_info=(type(exc), exc, exc.__traceback__))
    return await _openai_error(request, OpenAIError(500, f"internal server error: "
                                                         f"{type(exc).__name__}", None,
                                                    "internal_error"))


def bearer_token_matches(authorization: bytes | None, api_key: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <api_key>``: the scheme in
    any case (RFC 7235), the key compared in constant time."""
    scheme, _, token = (authorization or b"").strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)


class _ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` on /v1 routes (health, metrics and load stay open),
    checked before the body is read so a bad key is a 401 whatever the body."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: ServerMetrics) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            if not bearer_token_matches(headers.get(b"authorization"), self.api_key):
                self.metrics.rejected.labels("401").inc()
                err = OpenAIError(401, "missing or wrong API key (send 'Authorization: "
                                  "Bearer <key>')", None, "invalid_api_key")
                await JSONResponse(err.body(), status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
