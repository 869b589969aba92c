"""64 concurrent streaming clients, some of which hang up mid-stream, against the real
server: no 5xx, every completed stream is the offline greedy text, and once the run is
over every KV page is free again (read from /metrics)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from fbjax.sched.request import SamplingParams
from tests.serve.server import API_KEY, metric

NUM_CLIENTS = 64


def test_concurrent_streams_with_disconnects(server, reference):
    rng = random.Random(0)
    prompts = [f"request {i}: " + "".join(rng.choice("abcdefgh xyz") for _ in range(
        rng.randint(3, 60))) for i in range(NUM_CLIENTS)]
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    # Roughly a third hang up after a few events (before any text for some of them).
    hang_up_after = [rng.randint(0, 4) if rng.random() < 0.35 else None for _ in prompts]

    async def one(client: httpx.AsyncClient, i: int):
        body = {"prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0,
                "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, None
            text, events = [], 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return 200, "".join(text)
                events += 1
                text.append(json.loads(line[6:])["choices"][0]["text"])
                if hang_up_after[i] is not None and events > hang_up_after[i]:
                    return 200, None  # leaving the block closes the connection
        return 200, None

    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return await asyncio.gather(*(one(c, i) for i in range(NUM_CLIENTS)))

    results = asyncio.run(main())
    assert all(status < 500 for status, _ in results), [s for s, _ in results]
    assert all(status == 200 for status, _ in results)

    engine = reference.engine
    expected = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0)
                                         for m in max_tokens])
    finished = [(i, text) for i, (_, text) in enumerate(results) if text is not None]
    assert len(finished) >= NUM_CLIENTS // 2
    for i, text in finished:
        assert text == expected[i].text, f"request {i}"

    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(server.url + "/metrics").text
        free, total = (metric(text, "fbjax_kv_cache_free_pages"),
                       metric(text, "fbjax_kv_cache_total_pages"))
        if (free == total and metric(text, "fbjax_num_requests_running") == 0
                and metric(text, "fbjax_num_requests_waiting") == 0):
            break
        assert time.monotonic() < deadline, f"KV pool not full again: {free}/{total}"
        time.sleep(0.1)
    assert metric(text, "fbjax_requests_total", {"finish_reason": "abort"}) > 0


def test_non_streamed_client_that_leaves_aborts_its_requests(server):
    url = server.url + "/metrics"
    aborted = lambda: metric(httpx.get(url).text, "fbjax_requests_total",  # noqa: E731
                             {"finish_reason": "abort"}, default=0.0)
    before = aborted()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", timeout=0.5,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"prompt": "abc", "n": 16, "max_tokens": 480, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while aborted() < before + 16:
        assert time.monotonic() < deadline, "the 16 choices were not aborted"
        time.sleep(0.1)
    text = httpx.get(url).text
    assert metric(text, "fbjax_kv_cache_free_pages") == metric(text, "fbjax_kv_cache_total_pages")
