"""Engine latency profiles: keys, file round trip and schema, refusal across devices and
models, the profiler on a tiny grid, FairBatching on the real engine with online
refinement, and trace replay through the engine."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fbjax.config import BucketConfig, SchedulerConfig
from fbjax.profiling.device import current_device_key, device_key_of
from fbjax.profiling.measure import bucket_grid, fit_profile, measure, profile_grid
from fbjax.profiling.store import (
    ProfileError,
    check_profile,
    load_engine_profile,
    model_key,
    validate_engine_metadata,
)
from fbjax.sched.latency import LatencyModel, StepFeatures
from tests.conftest import TEST_BUCKETS, engine_config

TWO_BUCKETS = BucketConfig(token_buckets=(16, 32), seq_buckets=(4,))


def engine_meta(buckets: BucketConfig, **overrides) -> dict:
    meta = {"device": current_device_key(), "model": "builtin-tiny",
            "token_buckets": list(buckets.token_buckets),
            "seq_buckets": list(buckets.seq_buckets), "jax_version": "0.0",
            "kv_capacity_tokens": 8192, "page_size": 16}
    meta.update(overrides)
    return meta


def synthetic_profile(buckets: BucketConfig, scale: float = 1.0, **meta) -> LatencyModel:
    """Plausible CPU-like coefficients (seconds) for every bucket of ``buckets``."""
    coef = {(t, s): scale * np.array([1e-3 + 2e-5 * t + 5e-5 * s, 2e-5, 4e-5, 1e-5, 2e-4,
                                      1e-4])
            for t, s in buckets.pairs()}
    return LatencyModel(coef, metadata=engine_meta(buckets, **meta))


# ----- keys and checks -------------------------------------------------------------------------

@pytest.mark.parametrize("platform, kind, key", [
    ("cpu", "cpu", "cpu"),
    ("cpu", "AMD EPYC 7B13", "cpu"),
    ("gpu", "NVIDIA H100 80GB HBM3", "h100"),
    ("gpu", "NVIDIA A100-SXM4-80GB", "a100"),
    ("gpu", "NVIDIA H200", "h200"),
    ("tpu", "TPU v5 lite", "tpu-v5-lite"),
])
def test_device_key(platform, kind, key):
    assert device_key_of(platform, kind) == key


def test_model_key(tmp_path):
    assert model_key(None) == "builtin-tiny"
    assert model_key(str(tmp_path / "Llama-3-8B")) == "llama-3-8b"
    assert current_device_key() == "cpu"


def test_profile_file_round_trip_and_schema(tmp_path):
    model = synthetic_profile(TWO_BUCKETS)
    path = tmp_path / "cpu-builtin-tiny.json"
    model.save(path)
    loaded = LatencyModel.load(path)
    validate_engine_metadata(loaded.metadata, str(path))
    assert loaded.metadata == model.metadata
    f = StepFeatures.of_chunks([(1, 300, True), (12, 40, False)])
    assert loaded.predict((32, 4), f) == pytest.approx(model.predict((32, 4), f))
    for broken, match in ((dict(device=None), "'device'"), (dict(token_buckets=16), "list"),
                          (dict(seq_buckets=[0]), "positive"),
                          (dict(kv_capacity_tokens="8k"), "int")):
        meta = {k: v for k, v in engine_meta(TWO_BUCKETS, **broken).items() if v is not None}
        with pytest.raises(ProfileError, match=match):
            validate_engine_metadata(meta, "p.json")


def test_profile_of_other_device_or_model_is_refused_unless_forced():
    for meta, word in ((dict(device="h100"), "device 'h100'"),
                       (dict(model="llama3-8b"), "model 'llama3-8b'")):
        model = synthetic_profile(TEST_BUCKETS, **meta)
        with pytest.raises(ProfileError, match=word) as info:
            check_profile(model, device="cpu", model="builtin-tiny", buckets=TEST_BUCKETS)
        assert "--force_profile" in str(info.value)
        warnings = check_profile(model, device="cpu", model="builtin-tiny",
                                 buckets=TEST_BUCKETS, force=True)
        assert warnings and "forced" in warnings[0]
    with pytest.raises(ProfileError, match="lacks .* buckets"):
        check_profile(synthetic_profile(TWO_BUCKETS), device="cpu", model="builtin-tiny",
                      buckets=TEST_BUCKETS, force=True)


def test_engine_refuses_foreign_profile_before_compiling(tmp_path, builtin_model):
    from fbjax.engine.engine import LLMEngine

    path = tmp_path / "h100-builtin-tiny.json"
    synthetic_profile(TEST_BUCKETS, device="h100").save(path)
    config = engine_config(scheduler=SchedulerConfig(policy="fairbatching", profile=str(path)))
    with pytest.raises(ProfileError, match="recorded for device 'h100'"):
        LLMEngine(config, loaded=builtin_model)


def test_fairbatching_without_profile_names_the_flag(tmp_path, monkeypatch):
    from fbjax.profiling import store

    monkeypatch.setenv("FBJAX_PROFILE_DIR", str(tmp_path))
    monkeypatch.setattr(store, "PACKAGED_PROFILES_DIR", tmp_path / "packaged")
    with pytest.raises(ProfileError, match="--profile"):
        load_engine_profile(None, device="cpu", model="builtin-tiny", buckets=TEST_BUCKETS)


def test_committed_cpu_profile_is_valid_and_covers_the_default_buckets():
    latency, path, warnings = load_engine_profile(None, device="cpu", model="builtin-tiny",
                                                  buckets=BucketConfig())
    assert path.name == "cpu-builtin-tiny.json" and not warnings
    validate_engine_metadata(latency.metadata, str(path))
    assert latency.heldout is not None and latency.heldout.num_points > 0


# ----- the grid and the profiler ---------------------------------------------------------------

def test_grid_points_land_on_their_bucket():
    buckets = BucketConfig()
    points = profile_grid(buckets, 6, max_context=2047, max_kv_tokens=16384, page_size=16)
    assert {p.bucket for p in points} == set(buckets.pairs())
    for p in points:
        f = p.features
        assert buckets.pick(f.num_tokens, f.num_seqs) == p.bucket
        assert f.max_kv <= 2047
    kinds = {(p.features.num_decodes > 0, p.features.prefill_tokens > 0) for p in points}
    assert kinds == {(True, False), (False, True), (True, True)}
    assert bucket_grid(buckets, (64, 16), 5, max_context=2047, max_kv_tokens=16384,
                       page_size=16, seed=3) == bucket_grid(
        buckets, (64, 16), 5, max_context=2047, max_kv_tokens=16384, page_size=16, seed=3)


@pytest.fixture(scope="module")
def two_bucket_engine(builtin_model):
    from fbjax.engine.engine import LLMEngine

    return LLMEngine(engine_config(buckets=TWO_BUCKETS), loaded=builtin_model)


def test_profiler_on_two_buckets_gives_positive_monotone_model(two_bucket_engine):
    engine = two_bucket_engine
    points = profile_grid(TWO_BUCKETS, 8, max_context=engine.max_model_len - 1,
                          max_kv_tokens=engine.kv.capacity_tokens,
                          page_size=engine.kv.page_size)
    measurements = measure(engine, points, warmup=1, repeats=2)
    assert len(measurements) == len(points) and engine.kv.num_free_pages == engine.kv.num_pages
    model = fit_profile(measurements, engine_meta(TWO_BUCKETS))
    assert model.buckets == [(16, 4), (32, 4)] and model.heldout.num_points > 0
    prefill = [model.predict(TWO_BUCKETS.pick(n, 1), StepFeatures.of_chunks([(n, n, False)]))
               for n in range(1, 33)]
    decodes = [model.predict(TWO_BUCKETS.pick(n, n), StepFeatures.of_chunks([(1, 100, True)] * n))
               for n in range(1, 5)]
    for series in (prefill, decodes):
        assert all(p > 0 for p in series)
        assert all(b >= a for a, b in zip(series, series[1:], strict=False))


def test_measure_stops_at_the_time_limit(two_bucket_engine):
    points = profile_grid(TWO_BUCKETS, 8, max_context=200, max_kv_tokens=4096, page_size=16)
    assert measure(two_bucket_engine, points, repeats=1, time_limit_s=0.0) == []
    # Past the limit the first pass still gives every bucket its minimum of points.
    kept = measure(two_bucket_engine, points, repeats=2, time_limit_s=0.0, min_per_bucket=2)
    assert sorted(m.point.bucket for m in kept) == [(16, 4), (16, 4), (32, 4), (32, 4)]
    assert all(len(m.samples) == 1 for m in kept)
    with pytest.raises(ProfileError, match="too few"):
        fit_profile([], dict(engine_meta(TWO_BUCKETS), buckets_profiled=[[16, 4]]))


# ----- FairBatching on the engine --------------------------------------------------------------

@pytest.fixture(scope="module")
def fb_engine(builtin_model, tmp_path_factory):
    from fbjax.engine.engine import LLMEngine

    path = tmp_path_factory.mktemp("profiles") / "cpu-builtin-tiny.json"
    synthetic_profile(TEST_BUCKETS).save(path)
    config = engine_config(scheduler=SchedulerConfig(
        policy="fairbatching", profile=str(path), ttft_slo_s=2.0, tpot_slo_s=0.2))
    return LLMEngine(config, loaded=builtin_model)


def test_fairbatching_engine_completes_mixed_workload_and_learns_step_times(fb_engine):
    from fbjax.sched.fairbatching import FairBatchingScheduler
    from fbjax.sched.request import SamplingParams

    engine = fb_engine
    assert isinstance(engine.scheduler, FairBatchingScheduler)
    injected = 0.008  # every step "takes" 8 ms: the fake clock advances 8 ms per read
    ticks = [0.0]

    def clock() -> float:
        ticks[0] += injected
        return ticks[0]

    seen = []
    engine.step_clock = clock
    engine.step_observer = lambda plan, seconds: seen.append(
        (plan.bucket, StepFeatures.of_chunks((c.num_tokens, c.kv_len, c.is_decode)
                                             for c in plan.chunks), seconds))
    initial = {b: engine.latency.correction[b] for b in engine.latency.coefficients}
    rng = np.random.default_rng(0)
    ids = []
    try:
        for i in range(14):
            prompt = rng.integers(32, 127, size=int(rng.integers(5, 150))).tolist()
            ids.append(engine.add_request(prompt, SamplingParams(
                max_tokens=int(rng.integers(1, 25)), temperature=0.0, ignore_eos=True)))
            if i % 3 == 2:
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.step_clock = time.perf_counter
        engine.step_observer = None
    outputs = [engine.pop_finished(i) for i in ids]
    assert [o.finish_reason for o in outputs] == ["length"] * len(ids)
    assert all(len(o.token_ids) >= 1 for o in outputs)
    assert engine.kv.num_free_pages == engine.kv.num_pages
    assert all(s == pytest.approx(injected) for _, _, s in seen)
    # Online refinement moved the model toward the injected step time.
    latency = engine.latency
    assert latency.num_updates > 0
    err_before = err_after = 0.0
    for bucket, feats, seconds in seen:
        now = latency.predict(bucket, feats)
        then = now / latency.correction[bucket] * initial[bucket]
        err_before += abs(then - seconds)
        err_after += abs(now - seconds)
    print(f"abs error before {err_before:.4f} s after {err_after:.4f} s")
    assert err_after < 0.6 * err_before


def test_online_update_ignores_a_gc_pause_but_learns_a_lasting_change():
    model = synthetic_profile(TWO_BUCKETS)
    f = StepFeatures.of_chunks([(1, 100, True), (10, 10, False)])
    base = model.predict((16, 4), f)
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert model.update((16, 4), f, base * 1.2 * (1 + 0.03 * rng.standard_normal()))
    settled = model.correction[(16, 4)]
    assert not model.update((16, 4), f, base * 2.5)  # one GC pause, under the 3x gate
    assert model.correction[(16, 4)] == settled
    for _ in range(40):  # the machine got 2.5x slower for good
        model.update((16, 4), f, base * 2.5)
    assert model.correction[(16, 4)] > 2.0


def test_saved_refined_profile_keeps_the_correction(fb_engine, tmp_path):
    path = tmp_path / "refined.json"
    fb_engine.save_profile(path)
    data = json.loads(path.read_text())
    assert "online_refinement" in data["metadata"]
    loaded = LatencyModel.load(path)
    f = StepFeatures.of_chunks([(1, 50, True)])
    assert loaded.predict((16, 4), f) == pytest.approx(fb_engine.latency.predict((16, 4), f))


# ----- replay through the engine ---------------------------------------------------------------

def test_fit_lengths_scales_to_the_context():
    from fbjax.replay.engine import fit_lengths
    from fbjax.traces import Trace, TraceRequest

    trace = Trace("t", [TraceRequest(i * 0.1, p, o) for i, (p, o) in
                        enumerate([(100, 10), (4000, 300), (900, 50), (20000, 100)])])
    fitted, scaling = fit_lengths(trace, 2048, 0.25)
    assert [r.prompt_len for r in fitted][:3] == [25, 1000, 225]
    assert scaling.num_clipped == 1 and all(r.prompt_len + r.output_len < 2048 for r in fitted)
    assert "x0.250" in scaling.describe() and "1 longer" in scaling.describe()
    same, scaling = fit_lengths(Trace("s", [TraceRequest(0.0, 10, 5)]), 2048)
    assert scaling.factor == 1.0 and "unscaled" in scaling.describe()


def test_replay_through_engine_reports_every_request(fb_engine):
    from fbjax.replay.engine import engine_profile, replay_engine
    from fbjax.sim.experiment import SLO
    from fbjax.traces import Trace, TraceRequest

    trace = Trace("tiny", [TraceRequest(0.02 * i, 20 + 7 * i, 3 + i % 4) for i in range(8)])
    outcome = replay_engine(fb_engine, trace, SLO(2.0, 0.2), engine_profile(fb_engine))
    s = outcome.summary
    assert s.num_requests == s.completed == 8 and outcome.num_skipped == 0
    assert s.total_output_tokens == sum(r.output_len for r in trace)
    assert s.slo_attainment is not None and outcome.result.steps
    assert fb_engine.kv.num_free_pages == fb_engine.kv.num_pages
