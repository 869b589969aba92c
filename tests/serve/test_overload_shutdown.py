"""Overload (429 with Retry-After beyond --max_queue; accepted requests all finish) and
graceful shutdown on SIGTERM (in-flight streams end with a final event), on a server
of their own."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serve.server import ServerProcess


@pytest.fixture(scope="module")
def small_server():
    proc = ServerProcess("--max_queue", "2", "--shutdown_grace_s", "0.2", scheduler="vllm")
    yield proc
    proc.stop()


def test_beyond_max_queue_is_429_and_accepted_requests_finish(small_server):
    # Long prompts take several 64-token steps to prefill, so requests queue up.
    async def one(client, i):
        r = await client.post("/v1/completions", json={
            "prompt": f"{i} " + "lorem ipsum " * 33, "max_tokens": 6, "temperature": 0})
        return r

    async def main():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(12)))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 6


def test_sigterm_finishes_or_aborts_in_flight_streams_with_a_final_event(small_server):
    started = asyncio.Event

    async def stream(client, max_tokens, seen: asyncio.Event):
        events = []  # greedy text of "abc" is "ccc...": an event every step
        async with client.stream("POST", "/v1/completions", json={
                "prompt": "abc", "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    seen.set()
        return events

    async def main():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as c:
            tasks = []
            for max_tokens in (500, 500, 4):  # one at a time: --max_queue is 2
                seen = started()
                tasks.append(asyncio.create_task(stream(c, max_tokens, seen)))
                await asyncio.wait_for(seen.wait(), 60)
            small_server.signal()
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    results = asyncio.run(main())
    reasons = []
    for events in results:
        assert events[-1] == "[DONE]"
        reasons.append(json.loads(events[-2])["choices"][0]["finish_reason"])
    assert reasons == ["abort", "abort", "length"]
    assert small_server.proc.wait(30) == 0
    assert "server stopped" in small_server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(small_server.url + "/health", timeout=5)
