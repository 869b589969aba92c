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
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fbjax.engine.engine import InvalidRequestError, LLMEngine
from fbjax.sched.request import SamplingParams
from fbjax.serve.engine_loop import EngineLoop, Event, Submission
from fbjax.serve.metrics import ServerMetrics
from fbjax.serve.protocol import (
    MAX_N,
    MAX_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    model_card,
    new_id,
    now_s,
    usage,
)
from fbjax.serve.text import ChatTemplate, IncrementalText

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 256  # requests accepted but without a first token; more get 429
    slo_ttft_ms: float | None = None  # default per-request SLOs (None: the scheduler's)
    slo_tpot_ms: float | None = None
    shutdown_grace_s: float = 10.0  # on SIGTERM, in-flight requests get this long
    retry_after_s: int = 1


class ServerState:
    """Everything the handlers share: the engine thread, settings, metrics."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings,
                 chat_template: ChatTemplate | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.chat_template = chat_template or ChatTemplate.for_model(engine.config.model)
        self.metrics = ServerMetrics(engine.scheduler.name, settings.model_name,
                                     engine.kv.num_pages)
        self.loop = EngineLoop(engine, self.metrics)
        self.draining = False
        self.address: str | None = None  # where the server listens, for the start-up log

    def begin_drain(self) -> None:
        """Stop taking requests; abort what is still running after the grace period.
        Called on the event loop (from the SIGTERM handler)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d request(s) in flight get %.1f s to finish",
                 self.loop.num_in_flight, self.settings.shutdown_grace_s)
        asyncio.get_running_loop().create_task(self._abort_after_grace())

    async def _abort_after_grace(self) -> None:
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.loop.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in self.loop.in_flight():
            self.loop.abort(rid, notify=True)


# ----------------------------------------------------------------------------- a generation


class Generation:
    """The engine requests behind one HTTP request, and their streamed text."""

    def __init__(self, state: ServerState, submissions: list[Submission],
                 stop: tuple[str, ...], prompt_tokens: int) -> None:
        self.state = state
        self.submissions = submissions
        self.texts = [IncrementalText(state.tokenizer, stop) for _ in submissions]
        self.finish_reasons: list[str | None] = [None] * len(submissions)
        self.final_texts = [""] * len(submissions)
        self.include_usage = False  # stream_options.include_usage
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0  # the most any choice found in the prefix cache
        self._events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._added: list[str] = []

    async def start(self) -> None:
        """Hand every choice to the engine; all or nothing."""
        try:
            for i, sub in enumerate(self.submissions):
                await self.state.loop.add(sub, lambda ev, i=i: self._events.put_nowait((i, ev)))
                self._added.append(sub.request_id)
        except InvalidRequestError as e:
            self.abort()
            raise OpenAIError(400, str(e)) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Abort every choice that has not finished (the client is gone)."""
        for i, sub in enumerate(self.submissions):
            if self.finish_reasons[i] is None and sub.request_id in self._added:
                self.state.loop.abort(sub.request_id)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    async def deltas(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason or None) until every choice is done."""
        while not self.done:
            i, ev = await self._events.get()
            if ev.error is not None:
                self.finish_reasons[i] = "error"
                raise RuntimeError(ev.error)
            text = self.texts[i]
            if ev.final is None:
                delta = text.add(ev.new_token_ids)
                if delta:
                    yield i, delta, None
                continue
            delta = text.finish(ev.final.text)  # the final text, cut at a stop string
            self.final_texts[i] = ev.final.text
            self.finish_reasons[i] = ev.final.finish_reason
            self.completion_tokens += len(ev.final.token_ids)
            self.cached_tokens = max(self.cached_tokens, ev.final.num_cached_tokens)
            yield i, delta, ev.final.finish_reason

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens,
                     min(self.cached_tokens, self.prompt_tokens))


# ----------------------------------------------------------------------------- validation


def _check_sampling(body: Any) -> None:
    if body.temperature < 0:
        raise OpenAIError(400, f"temperature must be >= 0, got {body.temperature}",
                          "temperature")
    if not 0.0 < body.top_p <= 1.0:
        raise OpenAIError(400, f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    if body.top_k < -1:
        raise OpenAIError(400, f"top_k must be >= -1 (0 or -1 disables it), got {body.top_k}",
                          "top_k")
    if not 1 <= body.n <= MAX_N:
        raise OpenAIError(400, f"n must be between 1 and {MAX_N}, got {body.n}", "n")
    for name in ("slo_ttft_ms", "slo_tpot_ms"):
        value = getattr(body, name)
        if value is not None and value <= 0:
            raise OpenAIError(400, f"{name} must be > 0, got {value}", name)
    for field, why in body.unsupported():
        raise OpenAIError(400, why, field)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise OpenAIError(400, f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise OpenAIError(400, "stop strings must be non-empty", "stop")
    return stops


def _max_tokens(requested: int | None, prompt_len: int, context: int, param: str) -> int:
    """The max_tokens to run with: ``requested`` if it fits the context, or what is left
    of the context when the client gave none."""
    if prompt_len >= context:
        raise OpenAIError(413, f"the prompt has {prompt_len} tokens but the model's context "
                          f"is {context} tokens (at least one must be left to generate)",
                          "prompt", "context_length_exceeded")
    left = context - prompt_len
    if requested is None:
        return left
    if requested < 1:
        raise OpenAIError(400, f"{param} must be >= 1, got {requested}", param)
    if requested > left:
        raise OpenAIError(400, f"{param}={requested} is too large: the prompt has "
                          f"{prompt_len} tokens and the context is {context}, so at most "
                          f"{left} can be generated", param, "context_length_exceeded")
    return requested


# ----------------------------------------------------------------------------- the app


def build_app(state: ServerState) -> FastAPI:
    settings = state.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        if state.address is not None:
            log.info("listening on %s (model %r, scheduler %s)", state.address,
                     settings.model_name, state.engine.scheduler.name)
        yield
        state.loop.stop()

    app = FastAPI(title="fbjax", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server over the fbjax engine")
    app.state.fbjax = state

    if settings.api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key,
                           metrics=state.metrics)

    # ----- errors ---------------------------------------------------------------------
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        state.metrics.rejected.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await _openai_error(request, OpenAIError(exc.status_code, str(exc.detail)))

    # ----- helpers --------------------------------------------------------------------
    def check_model(model: str | None) -> str:
        if model is None or model in (settings.model_name, state.engine.config.model):
            return settings.model_name
        raise OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                          f"{settings.model_name!r}", "model", "model_not_found")

    def admit(num_choices: int) -> None:
        if state.draining:
            raise OpenAIError(503, "the server is shutting down", None, "shutting_down")
        if state.loop.num_queued + num_choices > settings.max_queue:
            raise OpenAIError(429, f"the queue is full ({state.loop.num_queued} requests "
                              f"waiting, limit {settings.max_queue}); retry later", None,
                              "queue_full", {"Retry-After": str(settings.retry_after_s)})

    def encode(prompt: str | list[int], param: str) -> list[int]:
        ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise OpenAIError(400, f"{param} is empty", param)
        return ids

    def submissions(body: Any, prompts: list[list[int]], requested: int | None,
                    param: str, stop: tuple[str, ...], arrival: float) -> list[Submission]:
        subs = []
        ttft = body.slo_ttft_ms if body.slo_ttft_ms is not None else settings.slo_ttft_ms
        tpot = body.slo_tpot_ms if body.slo_tpot_ms is not None else settings.slo_tpot_ms
        for ids in prompts:
            max_tokens = _max_tokens(requested, len(ids), state.max_model_len, param)
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % 2**32
                try:
                    sampling = SamplingParams(max_tokens=max_tokens,
                                              temperature=body.temperature, top_p=body.top_p,
                                              top_k=max(body.top_k, 0), seed=seed, stop=stop,
                                              ignore_eos=body.ignore_eos)
                    state.engine.encode_and_validate(ids, sampling)
                except (InvalidRequestError, ValueError) as e:
                    raise OpenAIError(400, str(e)) from None
                subs.append(Submission(new_id("req"), ids, sampling, arrival,
                                       None if ttft is None else ttft / 1000.0,
                                       None if tpot is None else tpot / 1000.0))
        return subs

    async def run(request: Request, gen: Generation, stream: bool, chunk, final):
        """Start ``gen`` and answer: a stream of ``chunk(i, delta, reason)`` events or,
        once all choices are done, ``final()``."""
        await gen.start()
        if stream:
            return StreamingResponse(_sse(gen, chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for _ in _until_disconnect(request, gen.deltas()):
                pass
        finally:
            gen.abort()
        if not gen.done:  # the client left
            return Response(status_code=499)
        return JSONResponse(final())

    async def _sse(gen: Generation, chunk) -> AsyncIterator[str]:
        try:
            for payload in chunk(None, None, None):  # opening chunks (chat: the role)
                yield _event(payload)
            async for i, delta, reason in gen.deltas():
                yield _event(chunk(i, delta, reason))
            if gen.include_usage:
                yield _event(chunk("usage", None, None))
        except RuntimeError as e:  # the engine failed this request
            yield _event(OpenAIError(500, str(e), None, "engine_error").body())
        finally:
            gen.abort()
        yield "data: [DONE]\n\n"

    # ----- endpoints ------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrival = time.monotonic()
        model = check_model(body.model)
        _check_sampling(body)
        stop = _stops(body.stop)
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise OpenAIError(400, "prompt is empty", "prompt")
        prompts = [encode(p, "prompt") for p in raw]
        requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
        if requested is None:  # OpenAI's default of 16, within what the context leaves
            requested = max(1, min(16, state.max_model_len - max(map(len, prompts))))
        subs = submissions(body, prompts, requested, "max_tokens", stop, arrival)
        admit(len(subs))
        gen = Generation(state, subs, stop, sum(map(len, prompts)))
        gen.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rid, created = new_id("cmpl"), now_s()

        def head(choices, usage_=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": model,
                   "choices": choices}
            if gen.include_usage or usage_ is not None:
                out["usage"] = usage_
            return out

        def chunk(i, delta, reason):
            if i is None:
                return []
            if i == "usage":
                return head([], gen.usage())
            return head([{"index": i, "text": delta, "logprobs": None,
                          "finish_reason": reason}])

        def final():
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(gen.final_texts, gen.finish_reasons,
                                                      strict=True))]
            return head(choices, gen.usage())

        return await run(request, gen, body.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        model = check_model(body.model)
        _check_sampling(body)
        stop = _stops(body.stop)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = state.chat_template.render(messages)
        except Exception as e:  # jinja2.TemplateError and whatever the template raises
            raise OpenAIError(400, f"the chat template refused the messages: {e}",
                              "messages") from None
        ids = encode(text, "messages")
        bos = state.tokenizer.bos_token_id
        if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
            ids = ids[1:]  # the template wrote BOS and the tokenizer added another
        requested = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None \
            else "max_tokens"
        subs = submissions(body, [ids], requested, param, stop, arrival)
        admit(len(subs))
        gen = Generation(state, subs, stop, len(ids))
        gen.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rid, created = new_id("chatcmpl"), now_s()

        def head(obj, choices, usage_=None):
            out = {"id": rid, "object": obj, "created": created, "model": model,
                   "choices": choices}
            if obj == "chat.completion" or gen.include_usage or usage_ is not None:
                out["usage"] = usage_
            return out

        def chunk(i, delta, reason):
            if i is None:
                return [head("chat.completion.chunk",
                             [{"index": j, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}])
                        for j in range(len(subs))]
            if i == "usage":
                return head("chat.completion.chunk", [], gen.usage())
            return head("chat.completion.chunk",
                        [{"index": i, "delta": {"content": delta} if delta else {},
                          "logprobs": None, "finish_reason": reason}])

        def final():
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(gen.final_texts, gen.finish_reasons,
                                                      strict=True))]
            return head("chat.completion", choices, gen.usage())

        return await run(request, gen, body.stream, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(settings.model_name,
                                                      state.max_model_len)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        return model_card(check_model(model), state.max_model_len)

    @app.get("/health")
    async def health():
        if state.draining:
            raise OpenAIError(503, "the server is shutting down", None, "shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load():
        out = await state.loop.call(load_snapshot)
        out.update(num_queued=state.loop.num_queued, max_queue=settings.max_queue,
                   draining=state.draining)
        return out

    return app


def load_snapshot(engine: LLMEngine) -> dict[str, Any]:
    """The engine's load as ``GET /load`` and the Ray Serve routing stats report it: queue
    and KV counts, and the scheduler's load estimate where it has one (FairBatching).
    Run it on the engine thread (``EngineLoop.call``)."""
    sched = engine.scheduler
    estimate = getattr(sched, "load_estimate", None)
    return {"scheduler": sched.name,
            "num_running": sched.num_running, "num_waiting": sched.num_waiting,
            "kv_free_pages": engine.kv.num_free_pages, "kv_total_pages": engine.kv.num_pages,
            "kv_usage": engine.kv.usage(),
            "prefix_cache_hit_rate": sched.prefix_cache_hit_rate(),
            "load_estimate": estimate(time.monotonic()) if callable(estimate) else None}


def _event(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _until_disconnect(request: Request, items: AsyncIterator):
    """``items`` until exhausted or the client disconnects, whichever comes first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    iterator = items.__aiter__()
    try:
        while True:
            task = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:  # the client is gone
                task.cancel()
                return
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()


class _ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` on /v1 routes (health, metrics and load stay open),
    checked before the body is read so a bad key is a 401 whatever the body."""

    def __init__(self, app, api_key: str, metrics: ServerMetrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != self.expected:
                self.metrics.rejected.labels("401").inc()
                err = OpenAIError(401, "missing or wrong API key (send 'Authorization: "
                                  "Bearer <key>')", None, "invalid_api_key")
                await JSONResponse(err.body(), status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
