"""Real processes on loopback: two replicas behind ``python -m fbjax.router``.

32 streaming clients run while one replica is killed: every stream either finishes
with all its tokens or ends with an error event and ``[DONE]``; none hangs. Then the
router keeps serving on the survivor, and requests sent to the dead replica before
the router noticed are retried there (counted in the router's /metrics).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from fbjax.router.server import REPLICA_HEADER
from tests.serve.server import DONE, ServerProcess, metric, sse_event

MAX_TOKENS = 24
MODEL = "fbjax-builtin-tiny"  # the name the built-in model is served under


class RouterProcess(ServerProcess):
    """``python -m fbjax.router`` with the replicas given (same start-up wait and log)."""

    def __init__(self, *args: str) -> None:
        import tempfile

        self._log = tempfile.NamedTemporaryFile("w+", prefix="fbjax-router-", suffix=".log",
                                                delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "fbjax.router", "--port", "0",
                                      *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
        self.url = self._wait_ready(timeout=120)
        self.base_url = self.url + "/v1"


@pytest.fixture(scope="module")
def cluster():
    replicas = [ServerProcess(), ServerProcess()]
    # A slow poll, so the router learns of the killed replica only by failing to reach it.
    router = RouterProcess("--replica", replicas[0].url, "--replica", replicas[1].url,
                           "--policy", "round_robin", "--poll_interval_s", "60")
    yield router, replicas
    router.stop()
    for r in replicas:
        r.stop()


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str,
                     on_token: Callable[[str], None] = lambda replica: None) -> dict:
    """One streamed completion: its text, finish reason, usage, any error event, and the
    replica that served it (``on_token(replica)`` is called for each text event)."""
    out = {"text": "", "finish_reason": None, "usage": None, "error": None, "done": False}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        out["replica"] = reply.headers[REPLICA_HEADER]
        async for line in reply.aiter_lines():
            event = sse_event(line)
            if event is None:
                continue
            if event == DONE:
                out["done"] = True
                break
            if "error" in event:
                out["error"] = event["error"]
                continue
            if event.get("usage"):
                out["usage"] = event["usage"]
            for choice in event.get("choices", []):
                out["text"] += choice.get("text", "")
                on_token(out["replica"])
                out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    return out


def test_killing_a_replica_mid_run_ends_every_stream_and_the_survivor_keeps_serving(cluster):
    router, replicas = cluster

    async def run() -> tuple[list[dict], list[dict]]:
        victim_streaming = asyncio.Event()

        def on_token(replica: str) -> None:
            if replica == replicas[1].url:
                victim_streaming.set()

        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            tasks = [asyncio.create_task(stream_one(client, router.url, f"client {i} says",
                                                    on_token)) for i in range(32)]
            await asyncio.wait_for(victim_streaming.wait(), timeout=120)
            replicas[1].signal(signal.SIGKILL)  # mid-run: its streams have begun
            first = await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)
            after = await asyncio.wait_for(asyncio.gather(
                *(stream_one(client, router.url, f"after {i}") for i in range(8))), 180)
            return first, after

    first, after = asyncio.run(run())
    for result in first:
        assert result["done"], result  # [DONE] always comes: nothing hangs
        if result["error"] is None:
            assert result["finish_reason"] == "length"
            assert result["usage"]["completion_tokens"] == MAX_TOKENS
        else:
            assert result["error"]["code"] == "replica_failed"
    on_survivor = [r for r in first if r["replica"] == replicas[0].url]
    assert on_survivor and all(r["error"] is None for r in on_survivor)
    assert any(r["error"] is not None for r in first)  # the victim's streams were cut
    for result in after:  # all on the survivor, some after a retry
        assert result["done"] and result["error"] is None and result["finish_reason"] == "length"
    text = httpx.get(router.url + "/metrics").text
    assert metric(text, "fbjax_router_retries_total", {"replica": replicas[1].url}) >= 1
    assert metric(text, "fbjax_router_replica_healthy", {"replica": replicas[1].url}) == 0
    assert httpx.get(router.url + "/health").status_code == 200


def test_router_refuses_bad_input_like_the_server(cluster):
    router, _ = cluster
    reply = httpx.post(router.url + "/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    reply = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                             "max_tokens": -3})
    assert 400 <= reply.status_code < 500 and "error" in reply.json()
