"""/load with the FairBatching scheduler: its load estimate reaches the router.

Until the engine builds FairBatching from its config (it needs a latency profile),
this test swaps the policy into an in-process engine, with a made-up latency model,
and drives the app with Starlette's TestClient (lifespan included, so the engine
thread runs)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fbjax.engine.engine import LLMEngine
from fbjax.sched.fairbatching import FairBatchingScheduler
from fbjax.sched.latency import LatencyModel
from fbjax.serve.app import ServerSettings, ServerState, build_app
from tests.conftest import TEST_BUCKETS, engine_config


def test_load_reports_the_fairbatching_estimate(builtin_model):
    engine = LLMEngine(engine_config(), loaded=builtin_model)
    latency = LatencyModel({b: [2e-3, 2e-5, 1e-4, 0.0, 0.0, 0.0]
                            for b in TEST_BUCKETS.pairs()})
    engine.scheduler = FairBatchingScheduler(engine.scheduler.limits, engine.kv, latency)
    app = build_app(ServerState(engine, ServerSettings(model_name="tiny", slo_ttft_ms=2000,
                                                       slo_tpot_ms=200)))
    with TestClient(app) as client:
        out = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5,
                                                   "temperature": 0})
        assert out.status_code == 200
        assert out.json()["usage"]["completion_tokens"] == 5
        load = client.get("/load").json()
        assert load["scheduler"] == "fairbatching"
        estimate = load["load_estimate"]
        assert estimate["prefill_admission_budget"] > 0
        assert estimate["num_running"] == 0 and estimate["queued_prefill_tokens"] == 0
        assert 'scheduler="fairbatching"' in client.get("/metrics").text
