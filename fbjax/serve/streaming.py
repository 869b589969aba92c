"""Delivering a :class:`Generation` to its client: as server-sent events, or as one JSON
body once every choice is done.

Either way a client that leaves stops its engine requests at once (their KV pages are
freed before the next step): the stream aborts them when it is closed, the non-streamed
wait watches for ``http.disconnect`` and answers 499.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fbjax.serve.generation import EngineRequestError, Generation
from fbjax.serve.responses import ResponseBodies
from fbjax.web.errors import OpenAIError

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


async def respond(request: Request, gen: Generation, stream: bool,
                  bodies: ResponseBodies) -> Response:
    """Start ``gen`` and answer with its stream or, once all choices are done, its final
    body (499 if the client left first)."""
    await gen.start()
    if stream:
        return StreamingResponse(_sse(gen, bodies), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        async for _ in until_disconnect(request, gen.deltas()):
            pass
    except EngineRequestError as e:
        raise OpenAIError(500, str(e), None, "engine_error") from None
    finally:
        gen.abort()
    if not gen.done:  # the client left
        return Response(status_code=499)
    return JSONResponse(bodies.final())


async def _sse(gen: Generation, bodies: ResponseBodies) -> AsyncIterator[str]:
    """Opening chunks, a chunk per delta, the usage chunk if asked for, ``[DONE]``; an
    engine failure becomes an error event before ``[DONE]``."""
    try:
        for payload in bodies.opening():
            yield event(payload)
        async for i, delta, reason in gen.deltas():
            yield event(bodies.chunk(i, delta, reason))
        if bodies.include_usage:
            yield event(bodies.usage_chunk())
    except EngineRequestError as e:
        yield event(OpenAIError(500, str(e), None, "engine_error").body())
    finally:
        gen.abort()
    yield DONE


def event(payload: Any) -> str:
    """One SSE ``data:`` event, compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def until_disconnect(request: Request, items: AsyncIterator[T]) -> AsyncIterator[T]:
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
