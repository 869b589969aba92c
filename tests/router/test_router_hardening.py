"""The router in front of key-protected replicas: it forwards the client's key on every
proxied route, answers malformed and oversized bodies with OpenAI 4xx errors, and stays
up for everyone else."""

from __future__ import annotations

import httpx
import pytest

from tests.router.test_router_processes import RouterProcess
from tests.serve.server import ServerProcess, metric

KEY = "router-key"


@pytest.fixture(scope="module")
def keyed_cluster():
    replica = ServerProcess("--api_key", KEY)
    router = RouterProcess("--replica", replica.url, "--max_body_bytes", "100000")
    yield router
    router.stop()
    replica.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_models_forwards_the_key(keyed_cluster):
    r = httpx.get(keyed_cluster.base_url + "/models", headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["id"]
    assert httpx.get(keyed_cluster.base_url + "/models", timeout=30).status_code == 401


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"prompt": ' + b"[" * 50_000,
                                  b"\xff\xfe not json"])
def test_malformed_bodies_are_a_400(keyed_cluster, body):
    r = httpx.post(keyed_cluster.base_url + "/completions", content=body, headers=auth(),
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_oversized_body_is_a_413_and_others_are_served(keyed_cluster):
    r = httpx.post(keyed_cluster.base_url + "/completions", headers=auth(), timeout=30,
                   json={"prompt": "x" * 200_000, "max_tokens": 1})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"]
    ok = httpx.post(keyed_cluster.base_url + "/completions", headers=auth(), timeout=60,
                    json={"prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    text = httpx.get(keyed_cluster.url + "/metrics", timeout=10).text
    assert metric(text, "fbjax_router_rejected_total", {"status": "413"}) >= 1
