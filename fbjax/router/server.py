"""The router's HTTP front door: OpenAI-compatible endpoints that forward to replicas.

Each request is placed by the shared policy and hold queue (``fbjax.routing.policy``,
``fbjax.routing.dispatch``) and forwarded unchanged; streams pass through byte for
byte. A background poller reads every replica's ``GET /load`` each
``poll_interval_s``: a reply refreshes its Prefill Admission Budget and marks it
healthy; no reply (or a draining one) marks it unhealthy, so no new request goes
there until it answers again.

Failures: a replica that cannot be reached, or fails before a non-streamed reply or
before a stream's first bytes, has not started anything the client saw, so the
request is retried on another replica (counted in ``fbjax_router_retries_total``). A
stream that breaks after its first bytes ends with an OpenAI-style error event and
``data: [DONE]``: the client learns at once, nothing hangs. With every replica down
the router answers 503; with the hold queue full, 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from fbjax.routing.dispatch import (
    DEFAULT_MAX_HOLD_S,
    DEFAULT_POLL_INTERVAL_S,
    Dispatcher,
    QueueFull,
)
from fbjax.routing.policy import NoHealthyReplica, ReplicaState, make_policy
from fbjax.web.errors import OpenAIError
from fbjax.web.limits import BodyLimitMiddleware, HttpLimits

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-fbjax-replica"  # which replica answered: for operators and tests

# Headers that describe one hop's connection, not the message (RFC 9110 7.6.1).
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "host", "content-length"}


@dataclasses.dataclass
class RouterSettings:
    replicas: list[str]  # base URLs, e.g. http://127.0.0.1:8001
    policy: str = "pab"
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    max_hold_s: float = DEFAULT_MAX_HOLD_S  # longest a request waits for a budget
    max_queue: int = 1024  # held requests beyond this get 429
    request_timeout_s: float = 600.0
    retry_after_s: int = 1
    limits: HttpLimits = dataclasses.field(default_factory=HttpLimits)


class RouterMetrics:
    def __init__(self, replicas: list[str], policy: str) -> None:
        self.registry = r = CollectorRegistry()
        self.routed = Counter("fbjax_router_routed", "Requests sent to each replica",
                              ["replica"], registry=r)
        self.retries = Counter("fbjax_router_retries", "Requests retried on another replica "
                               "after one failed before answering", ["replica"], registry=r)
        self.stream_errors = Counter("fbjax_router_stream_errors", "Streams cut by a "
                                     "replica failure after their first bytes", registry=r)
        self.held = Counter("fbjax_router_held", "Requests held until a replica could admit "
                            "them", registry=r)
        self.rejected = Counter("fbjax_router_rejected", "Requests refused, by HTTP status",
                                ["status"], registry=r)
        self.healthy = Gauge("fbjax_router_replica_healthy", "1 if the replica answers",
                             ["replica"], registry=r)
        self.in_flight = Gauge("fbjax_router_in_flight", "Requests in flight per replica",
                               ["replica"], registry=r)
        self.budget = Gauge("fbjax_router_replica_budget_tokens", "Last Prefill Admission "
                            "Budget less prompts sent since", ["replica"], registry=r)
        for url in replicas:
            self.routed.labels(url)
            self.retries.labels(url)
        self.policy = policy

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Router:
    """Replica states, the hold queue and the HTTP client the handlers share."""

    def __init__(self, settings: RouterSettings,
                 count_prompt_tokens: Callable[[str, dict[str, Any]], int]) -> None:
        if not settings.replicas:
            raise ValueError("the router needs at least one --replica")
        self.settings = settings
        self.urls = [u.rstrip("/") for u in settings.replicas]
        # Unknown until the first poll: a replica is used only once it has answered.
        self.replicas = [ReplicaState(u, healthy=False) for u in self.urls]
        self.dispatcher: Dispatcher[asyncio.Future] = Dispatcher(
            make_policy(settings.policy), settings.max_hold_s, settings.max_queue)
        self.metrics = RouterMetrics(self.urls, settings.policy)
        self.count_prompt_tokens = count_prompt_tokens
        self.client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task | None = None

    # ----- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(
            self.settings.request_timeout_s, connect=5.0))
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self._fail_held(OpenAIError(503, "the router is shutting down", None,
                                    "shutting_down"))
        if self.client is not None:
            await self.client.aclose()

    # ----- load reports --------------------------------------------------------------
    async def poll_once(self) -> None:
        replies = await asyncio.gather(*(self._load(u) for u in self.urls))
        for url, replica, reply in zip(self.urls, self.replicas, replies, strict=True):
            was = replica.healthy
            replica.healthy = reply is not None and not reply.get("draining", False)
            if was != replica.healthy:
                log.warning("replica %s is %s", url, "up" if replica.healthy else "DOWN")
            estimate = (reply or {}).get("load_estimate") or {}
            replica.on_poll(estimate.get("prefill_admission_budget"))
            self.metrics.healthy.labels(url).set(int(replica.healthy))
            if replica.budget is not None:
                self.metrics.budget.labels(url).set(replica.budget)
        self.redispatch()

    async def _load(self, url: str) -> dict[str, Any] | None:
        try:
            reply = await self.client.get(url + "/load", timeout=max(
                1.0, 4 * self.settings.poll_interval_s))
            return reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poll must never kill the poller
                log.exception("load poll failed")

    # ----- placement -----------------------------------------------------------------
    async def place(self, prompt_tokens: int) -> int:
        """The replica for a request: now, or once the hold queue releases it."""
        future = asyncio.get_running_loop().create_future()
        try:
            index = self.dispatcher.route(future, prompt_tokens, time.monotonic(),
                                          self.replicas)
        except QueueFull as e:
            self.metrics.rejected.labels("429").inc()
            raise OpenAIError(429, f"{e}; retry later", None, "router_queue_full",
                              {"Retry-After": str(self.settings.retry_after_s)}) from None
        except NoHealthyReplica:
            self.metrics.rejected.labels("503").inc()
            raise OpenAIError(503, "no healthy replica", None, "no_replica") from None
        if index is None:
            self.metrics.held.inc()
            try:
                index = await future
            except asyncio.CancelledError:  # the client left while held
                if future.done() and not future.cancelled():
                    self._release(future.result())
                else:
                    future.cancel()
                raise
        self.metrics.routed.labels(self.urls[index]).inc()
        self.metrics.in_flight.labels(self.urls[index]).set(self.replicas[index].in_flight)
        return index

    def redispatch(self) -> None:
        """Offer held requests again (after a poll or a completion)."""
        try:
            placed = self.dispatcher.dispatch(time.monotonic(), self.replicas)
        except NoHealthyReplica:
            self._fail_held(OpenAIError(503, "no healthy replica", None, "no_replica"))
            return
        for future, index in placed:
            if future.done():  # its client left while held: nothing runs there
                self._release(index)
            else:
                future.set_result(index)

    def _fail_held(self, error: OpenAIError) -> None:
        held, self.dispatcher.held = self.dispatcher.held, []
        for h in held:
            if not h.item.done():
                self.metrics.rejected.labels(str(error.status)).inc()
                h.item.set_exception(error)

    def _release(self, index: int) -> None:
        self.replicas[index].on_finished()
        self.metrics.in_flight.labels(self.urls[index]).set(self.replicas[index].in_flight)

    def finished(self, index: int) -> None:
        self._release(index)
        self.redispatch()

    # ----- forwarding ----------------------------------------------------------------
    async def forward(self, path: str, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise OpenAIError(400, f"malformed JSON body: {type(e).__name__}: {e}"[:300],
                              None, "invalid_json") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", None, "invalid_json")
        try:
            prompt_tokens = self.count_prompt_tokens(path, body)
        except Exception:  # noqa: BLE001 -- a body of the wrong shape is the replica's to refuse
            prompt_tokens = 0
        headers = _forwarded(request)
        for _ in range(len(self.urls)):
            index = await self.place(prompt_tokens)
            url = self.urls[index]
            try:
                upstream = await self.client.send(
                    self.client.build_request("POST", url + path, content=raw,
                                              headers=headers), stream=True)
            except httpx.HTTPError as e:
                self._replica_failed(index, e)
                continue
            if not body.get("stream") or upstream.status_code != 200:
                try:
                    content = await upstream.aread()
                except httpx.HTTPError as e:
                    self._replica_failed(index, e)
                    continue
                finally:
                    await upstream.aclose()
                self.finished(index)
                return Response(content, upstream.status_code, media_type=upstream.headers.get(
                    "content-type"), headers={**_passthrough(upstream.headers),
                                              REPLICA_HEADER: url})
            chunks = upstream.aiter_raw()
            try:
                first = await chunks.__anext__()
            except (httpx.HTTPError, StopAsyncIteration) as e:
                await upstream.aclose()
                self._replica_failed(index, e)
                continue
            return StreamingResponse(self._relay(index, upstream, first, chunks),
                                     upstream.status_code,
                                     media_type=upstream.headers.get("content-type"),
                                     headers={REPLICA_HEADER: url})
        self.metrics.rejected.labels("503").inc()
        raise OpenAIError(503, "every replica failed to take the request", None, "no_replica")

    async def _relay(self, index: int, upstream: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as e:
            # Health is the poller's call: a cut stream may be the network, not the replica.
            self.metrics.stream_errors.inc()
            log.warning("stream from %s broke: %r", self.urls[index], e)
            error = OpenAIError(502, f"replica {self.urls[index]} failed mid-stream: "
                                f"{type(e).__name__}", None, "replica_failed")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            await upstream.aclose()
            self.finished(index)

    def _replica_failed(self, index: int, error: BaseException) -> None:
        url = self.urls[index]
        log.warning("replica %s failed before answering (%r); retrying elsewhere", url, error)
        self.replicas[index].healthy = False
        self.metrics.healthy.labels(url).set(0)
        self.metrics.retries.labels(url).inc()
        self.finished(index)

    async def get_from_any(self, path: str, request: Request) -> Response:
        """``GET path`` from the first healthy replica, with the client's headers
        (Authorization included: key-protected replicas need it)."""
        headers = _forwarded(request)
        for index in (i for i, r in enumerate(self.replicas) if r.healthy):
            try:
                reply = await self.client.get(self.urls[index] + path, headers=headers)
            except httpx.HTTPError:
                continue
            return Response(reply.content, reply.status_code,
                            media_type=reply.headers.get("content-type"))
        raise OpenAIError(503, "no healthy replica", None, "no_replica")


def _forwarded(request: Request) -> dict[str, str]:
    """The client's end-to-end headers, for the replica (Authorization among them)."""
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}


def _passthrough(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k.lower() not in HOP_HEADERS and k.lower() != "content-type"}


def build_router_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="fbjax router", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=router.settings.limits.max_body_bytes,
                       on_reject=lambda status: router.metrics.rejected.labels(str(status)).inc())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        router.metrics.rejected.labels(str(exc.status_code)).inc()
        return await _openai_error(request, OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        router.metrics.rejected.labels("500").inc()
        return await _openai_error(request, OpenAIError(
            500, f"internal router error: {type(exc).__name__}", None, "internal_error"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router.forward("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await router.forward("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request):
        return await router.get_from_any("/v1/models", request)

    @app.get("/health")
    async def health():
        if not any(r.healthy for r in router.replicas):
            raise OpenAIError(503, "no healthy replica", None, "no_replica")
        return {"status": "ok", "healthy_replicas": sum(r.healthy for r in router.replicas)}

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load():
        return {"policy": router.settings.policy, "held": len(router.dispatcher.held),
                "replicas": [{"url": u, "healthy": r.healthy, "in_flight": r.in_flight,
                              "budget": r.budget} for u, r in zip(router.urls,
                                                                   router.replicas,
                                                                   strict=True)]}

    return app
