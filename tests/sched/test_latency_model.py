"""LatencyModel: NNLS fit recovers known coefficients, held-out error, JSON round trip and
validation, online refinement with outlier rejection, unknown buckets."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fbjax.sched.latency import FEATURES, FORMAT, FitError, LatencyModel, StepFeatures, nnls

BUCKETS = [(16, 4), (64, 4), (64, 16), (256, 16)]


def true_coefficients(bucket) -> np.ndarray:
    """Known non-negative truth per bucket; max_kv costs nothing (a zero to recover)."""
    tokens, seqs = bucket
    return np.array([0.002 + 1e-5 * tokens + 1e-4 * seqs,  # intercept, s
                     2e-5,  # per prefill token
                     1.5e-4 * (1 + seqs / 16),  # per decode
                     4e-6,  # per 1e3 q*kv
                     3e-5,  # per 1e3 kv tokens read
                     0.0])  # per 1e3 of the longest context


def random_step(rng: random.Random, bucket) -> StepFeatures:
    tokens, seqs = bucket
    n_seqs = rng.randint(1, seqs)
    n_dec = rng.randint(0, n_seqs)
    chunks = [(1, rng.randint(1, 4000), True) for _ in range(n_dec)]
    room = tokens - n_dec
    for _ in range(n_seqs - n_dec):
        if room <= 0:
            break
        q = rng.randint(1, room)
        room -= q
        chunks.append((q, q + rng.randint(0, 3000), False))
    return StepFeatures.of_chunks(chunks)


def synthetic_points(seed: int, per_bucket: int = 40, noise: float = 0.0):
    rng = random.Random(seed)
    points = []
    for bucket in BUCKETS:
        coef = true_coefficients(bucket)
        for _ in range(per_bucket):
            feats = random_step(rng, bucket)
            seconds = float(coef @ feats.vector())
            if noise:
                seconds *= 1 + rng.gauss(0, noise)
            points.append((bucket, feats, seconds))
    return points


def simple_model(**kw) -> LatencyModel:
    return LatencyModel({b: true_coefficients(b) for b in BUCKETS}, **kw)


# ----- features ------------------------------------------------------------------------------

def test_step_features_sum_chunks():
    f = StepFeatures.of_chunks([(1, 100, True), (30, 50, False), (1, 7, True)])
    assert (f.prefill_tokens, f.num_decodes, f.num_tokens, f.num_seqs) == (30, 2, 32, 3)
    assert (f.attn_qk, f.kv_read, f.max_kv) == (100 + 1500 + 7, 157, 100)
    assert f.vector().tolist() == [1.0, 30, 2, 1.607, 0.157, 0.1]
    g = f.with_chunk(4, 400, False)
    assert (g.num_tokens, g.max_kv, f.num_tokens) == (36, 400, 32)  # f unchanged
    assert len(FEATURES) == len(f.vector())


def test_nnls_matches_unconstrained_when_positive_and_clips_otherwise():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=(50, 3))
    x = nnls(a, a @ np.array([1.0, 2.0, 3.0]))
    assert np.allclose(x, [1, 2, 3])
    x = nnls(a, a @ np.array([1.0, -2.0, 3.0]))
    assert (x >= 0).all() and x[1] == 0


# ----- fitting -------------------------------------------------------------------------------

def test_fit_recovers_exact_coefficients():
    points = synthetic_points(0)
    fitted = LatencyModel.fit(points, metadata={"device": "synthetic"})
    assert fitted.buckets == sorted(BUCKETS)
    for bucket in BUCKETS:
        assert np.allclose(fitted.coefficients[bucket], true_coefficients(bucket),
                           rtol=1e-6, atol=1e-12), bucket
        assert (fitted.coefficients[bucket] >= 0).all()
    # every 5th point (index 2, 7, ...) of each bucket is held out and reported
    assert fitted.heldout.num_points == len(BUCKETS) * 8
    assert fitted.heldout.mape < 1e-6 and fitted.heldout.p95_abs_ms < 1e-6
    assert fitted.metadata == {"device": "synthetic"}


def test_fit_with_two_percent_noise():
    fitted = LatencyModel.fit(synthetic_points(1, per_bucket=200, noise=0.02))
    # the held-out error reports the noise (mean |N(0, 2%)| is 1.6%), not an overfit
    assert 0.01 < fitted.heldout.mape < 0.025
    fresh = synthetic_points(2, per_bucket=50)  # noise-free truth
    error = fitted.error_on(fresh)
    assert error.mape < 0.01 and error.num_points == 200
    for bucket in BUCKETS:
        coef = fitted.coefficients[bucket]
        assert (coef >= 0).all()
        assert coef[0] == pytest.approx(true_coefficients(bucket)[0], rel=0.15)


def test_pooled_fit_learns_shared_slopes_from_three_points_a_bucket():
    """Where slopes are the same in every bucket (only the intercept differs), three
    noisy points a bucket are enough for the pooled fit, not for six coefficients each."""

    def shared(bucket) -> np.ndarray:
        return np.concatenate([true_coefficients(bucket)[:1], [2e-5, 2e-4, 4e-6, 3e-5, 0.0]])

    rng = random.Random(5)
    points = []
    for bucket in BUCKETS:
        for _ in range(4):
            feats = random_step(rng, bucket)
            points.append((bucket, feats, float(shared(bucket) @ feats.vector())
                           * (1 + rng.gauss(0, 0.02))))
    pooled = LatencyModel.fit(points, pooled=True)
    each = LatencyModel.fit(points)
    fresh = [(b, f, float(shared(b) @ f.vector()))
             for b in BUCKETS for f in (random_step(rng, b) for _ in range(50))]
    assert pooled.error_on(fresh).mape < 0.05
    assert pooled.error_on(fresh).mape < each.error_on(fresh).mape
    slopes = {tuple(c[1:]) for c in pooled.coefficients.values()}
    assert len(slopes) == 1  # one set of slopes, per-bucket intercepts
    assert all((c >= 0).all() for c in pooled.coefficients.values())
    assert pooled.heldout.num_points == len(BUCKETS)


def test_fit_clamps_to_non_negative():
    rng = random.Random(3)
    points = []
    for _ in range(30):
        feats = random_step(rng, (64, 4))
        v = feats.vector()
        points.append(((64, 4), feats, 0.01 + 1e-4 * v[1] - 1e-6 * v[3]))  # negative qk cost
    fitted = LatencyModel.fit(points)
    assert (fitted.coefficients[(64, 4)] >= 0).all()


def test_no_holdout_for_tiny_buckets_or_when_disabled():
    points = synthetic_points(4, per_bucket=2)
    assert LatencyModel.fit(points).heldout is None
    assert LatencyModel.fit(synthetic_points(4), holdout_every=0).heldout is None


# ----- predict -------------------------------------------------------------------------------

def test_predict_is_the_linear_model():
    m = simple_model()
    f = StepFeatures.of_chunks([(1, 1000, True), (40, 40, False)])
    assert m.predict((64, 4), f) == pytest.approx(float(true_coefficients((64, 4)) @ f.vector()))


def test_unknown_bucket_raises_key_error_naming_it():
    with pytest.raises(KeyError, match=r"\(99, 3\)"):
        simple_model().predict((99, 3), StepFeatures())


def test_empty_model_rejected():
    with pytest.raises(ValueError):
        LatencyModel({})


# ----- save / load ---------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    fitted = LatencyModel.fit(synthetic_points(5, noise=0.01), metadata={"gpu": "x", "n": 3})
    path = tmp_path / "profile.json"
    fitted.save(path)
    loaded = LatencyModel.load(path)
    assert loaded.buckets == fitted.buckets
    assert loaded.metadata == {"gpu": "x", "n": 3}
    assert loaded.heldout == fitted.heldout
    for bucket, feats, _ in synthetic_points(6):
        assert loaded.predict(bucket, feats) == fitted.predict(bucket, feats)
    assert json.loads(path.read_text())["format"] == FORMAT


def test_saved_model_keeps_its_online_correction(tmp_path):
    m = simple_model()
    f = StepFeatures.of_chunks([(1, 100, True)])
    for _ in range(5):
        assert m.update((16, 4), f, 1.3 * m.predict((16, 4), f) / m.correction[(16, 4)])
    m.save(tmp_path / "p.json")
    loaded = LatencyModel.load(tmp_path / "p.json")
    assert loaded.predict((16, 4), f) == pytest.approx(m.predict((16, 4), f))
    assert loaded.predict((64, 4), f) == pytest.approx(m.predict((64, 4), f))


def profile_json(**overrides) -> dict:
    data = {"format": FORMAT, "features": list(FEATURES), "metadata": {},
            "heldout": None, "buckets": {"16x4": [0.001, 0, 0, 0, 0, 0]}}
    data.update(overrides)
    return data


@pytest.mark.parametrize("text, match", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps(profile_json(format="other")), "not an fbjax latency profile"),
    (json.dumps(profile_json(features=["intercept"])), "features"),
    (json.dumps(profile_json(buckets={})), "buckets"),
    (json.dumps(profile_json(buckets={"16by4": [0] * 6})), "bad bucket key"),
    (json.dumps(profile_json(buckets={"0x4": [0] * 6})), "bad bucket key"),
    (json.dumps(profile_json(buckets={"16x4": [0.001, -1e-5, 0, 0, 0, 0]})), "non-negative"),
    (json.dumps(profile_json(buckets={"16x4": [0.001, 0, 0]})), "non-negative"),
    (json.dumps(profile_json(buckets={"16x4": 0.001})), "non-negative"),
    (json.dumps(profile_json(buckets={"16x4": [0.001, "a", 0, 0, 0, 0]})), "non-negative"),
    (json.dumps(profile_json(buckets={"16x4": [True, 0, 0, 0, 0, 0]})), "non-negative"),
    (json.dumps(profile_json(buckets={"16x4": [float("nan"), 0, 0, 0, 0, 0]})), "finite"),
    (json.dumps(profile_json(buckets={"16x4": [float("inf"), 0, 0, 0, 0, 0]})), "finite"),
    (json.dumps(profile_json(heldout={"mape": 0.1})), "heldout"),
])
def test_malformed_profile_raises_value_error_naming_the_file(tmp_path, text, match):
    path = tmp_path / "bad-profile.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        LatencyModel.load(path)
    assert str(path) in str(info.value)


def test_missing_profile_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        LatencyModel.load(tmp_path / "nope.json")


def test_valid_minimal_profile_loads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(profile_json(heldout={"mape": 0.1, "p95_abs_ms": 2.0,
                                                     "num_points": 7})))
    m = LatencyModel.load(path)
    assert m.buckets == [(16, 4)] and m.heldout == FitError(0.1, 2.0, 7)
    assert m.predict((16, 4), StepFeatures()) == pytest.approx(0.001)


# ----- online refinement ---------------------------------------------------------------------

def test_update_moves_predictions_toward_measured_times():
    m = simple_model()
    rng = random.Random(7)
    bucket = (64, 16)
    feats = [random_step(rng, bucket) for _ in range(60)]
    truth = simple_model()  # the device is uniformly 1.3x slower than profiled
    gaps = []
    for f in feats:
        measured = 1.3 * truth.predict(bucket, f)
        gaps.append(abs(measured - m.predict(bucket, f)) / measured)
        assert m.update(bucket, f, measured)
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False))  # closer every step
    assert m.correction[bucket] == pytest.approx(1 + 0.3 * (1 - 0.9 ** 60))
    assert m.correction[bucket] == pytest.approx(1.3, rel=0.01)
    assert m.correction[(16, 4)] == 1.0  # other buckets untouched
    assert m.num_outliers == 0


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_update_rejects_outliers(factor):
    m = simple_model()
    f = StepFeatures.of_chunks([(1, 500, True), (20, 20, False)])
    for _ in range(3):
        m.update((16, 4), f, 1.3 * m.predict((16, 4), f) / m.correction[(16, 4)])
    before = m.correction[(16, 4)]
    prediction = m.predict((16, 4), f)
    assert not m.update((16, 4), f, factor * prediction)  # a GC pause, a clock glitch
    assert m.num_outliers == 1
    assert m.correction[(16, 4)] == before
    assert m.predict((16, 4), f) == prediction
    assert not m.update((16, 4), f, 0.0)  # nonsense, ignored
    assert m.correction[(16, 4)] == before
