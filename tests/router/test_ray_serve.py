"""fbjax on a local Ray Serve instance with 2 CPU replicas: streaming works through Ray's
proxy, and the custom request router sends new requests away from the replica whose
published load says it is busy (its routing stats), as the replicas' counts show."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402

from fbjax.config import BucketConfig, CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from fbjax.serve.app import ServerSettings  # noqa: E402
from fbjax.serve.ray_app import REPLICA_HEADER, fbjax_application  # noqa: E402

PORT = 18123
MODEL = "tiny"
POLICY = "fairbatching"  # its load estimate is what the router ranks by


@pytest.fixture(scope="module")
def ray_serve():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    config = EngineConfig(buckets=BucketConfig((16, 64), (4,)), cache=CacheConfig(16, 256),
                          max_model_len=1024, show_progress=False,
                          scheduler=SchedulerConfig(policy=POLICY))
    serve.run(fbjax_application(config, ServerSettings(model_name=MODEL), 2,
                                stats_period_s=0.1), route_prefix="/")
    yield f"http://127.0.0.1:{PORT}"
    serve.shutdown()
    ray.shutdown()


def stream(url: str, prompt: str, max_tokens: int,
           started: threading.Event | None = None) -> tuple[str, list[str]]:
    """One streamed completion: the replica that served it and its SSE lines."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line:
                lines.append(line)
                if started is not None:
                    started.set()
        return reply.headers[REPLICA_HEADER], lines


def test_streaming_through_ray_serve(ray_serve):
    replica, lines = stream(ray_serve, "hello ray", 8)
    assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2]
    assert replica


def test_router_avoids_the_busy_replica(ray_serve):
    busy: dict[str, str] = {}
    started = threading.Event()

    def long_request():
        busy["replica"], _ = stream(ray_serve, "a long one " * 6, 900, started)

    worker = threading.Thread(target=long_request)
    worker.start()
    assert started.wait(60)
    time.sleep(0.4)  # a few stats periods: its replica now reports the request
    served = []
    for i in range(3):
        served.append(stream(ray_serve, f"short {i}", 2)[0])
        time.sleep(0.25)  # let the stats show the short one gone again
    still_running = worker.is_alive()
    worker.join(120)
    assert still_running, "the long request ended before the short ones were routed"
    assert busy["replica"] not in served, (busy, served)
