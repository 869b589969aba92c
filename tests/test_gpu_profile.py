"""GPU latency profiles from vidur data (fbjax.profiling.vidur, fbjax/configs/profiles).

The committed JSON profiles are checked on their own (load, positive, monotone within
and across buckets); where the shared vidur CSVs are present (see
``fbjax.resources``) the recipe is checked against the README's worked numbers and the
JSON files are rebuilt to show they are reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest

from fbjax.config import BucketConfig
from fbjax.profiling import vidur
from fbjax.resources import PACKAGED_PROFILES_DIR as PROFILES_DIR
from fbjax.resources import SharedDataNotFound
from fbjax.sched.latency import LatencyModel, StepFeatures

NAMES = vidur.DEFAULT_PROFILES
try:
    SHARED, MISSING = vidur.default_shared_dir(), ""
except SharedDataNotFound as e:
    SHARED, MISSING = None, str(e)
needs_shared = pytest.mark.skipif(SHARED is None, reason=f"vidur CSVs: {MISSING}")


@pytest.fixture(scope="module", params=NAMES)
def profile(request) -> tuple[str, LatencyModel]:
    return request.param, LatencyModel.load(PROFILES_DIR / f"{request.param}.json")


def _buckets(model: LatencyModel) -> BucketConfig:
    return BucketConfig(tuple(model.metadata["token_buckets"]),
                        tuple(model.metadata["seq_buckets"]))


def test_profile_loads_with_metadata(profile):
    name, model = profile
    meta = model.metadata
    device, model_name = vidur.PROFILES[name]
    assert (meta["device"], meta["model"], meta["tp"]) == (device, model_name, 1)
    assert meta["num_layers"] == vidur.MODELS[model_name]["num_layers"] == 32
    buckets = _buckets(model)
    assert buckets == vidur.GPU_BUCKETS
    assert sorted(model.coefficients) == sorted(buckets.pairs())
    assert meta["vidur"]["commit"] == vidur.VIDUR_COMMIT
    assert meta["measured"]["linear_ops"]["file"].endswith("mlp.csv")
    assert "legacy/a100/attention.csv" in meta["modelled"]["attention"]["calibration"]["file"]
    assert meta["device_peaks"] == vidur.DEVICES[device]
    assert meta["kv_capacity_tokens"] > 50_000
    assert model.heldout is not None and model.heldout.mape < 0.03


def test_kv_cache_tokens():
    # Llama-3-8B on an 80 GiB A100: 90 % of memory minus bf16 weights, 128 KiB per token.
    expected = (0.9 * 80 * 2**30 - 8_030_261_248 * 2) // (2 * 32 * 8 * 128 * 2)
    assert vidur.kv_cache_tokens(32, 8, 128, 8_030_261_248, 80) == expected
    # TP shards both the weights and the kv heads.
    one = vidur.kv_cache_tokens(80, 8, 128, 68_976_648_192, 80, tp=2)
    assert one == int((0.9 * 80 * 2**30 - 68_976_648_192) // (2 * 80 * 4 * 128 * 2))
    assert vidur.kv_cache_tokens(80, 8, 128, 68_976_648_192, 80) == 0  # no room
    with pytest.raises(ValueError):
        vidur.kv_cache_tokens(32, 8, 128, 1, 80, memory_utilization=1.5)


def _predict(model: LatencyModel, bucket, chunks) -> float:
    return model.predict(bucket, StepFeatures.of_chunks(chunks))


def test_predictions_positive_and_monotone_within_bucket(profile):
    _, model = profile
    for t, s in _buckets(model).pairs():
        prefill = [_predict(model, (t, s), [(n, n + 1024, False)])
                   for n in range(1, t + 1, max(t // 16, 1))]
        assert prefill[0] > 0 and np.all(np.diff(prefill) >= 0), (t, s)
        decode_count = [_predict(model, (t, s), [(1, 2048, True)] * n)
                        for n in range(1, min(s, t) + 1)]
        assert decode_count[0] > 0 and np.all(np.diff(decode_count) >= 0), (t, s)
        context = [_predict(model, (t, s), [(1, kv, True)] * min(s, t))
                   for kv in (1, 64, 512, 2048, 8192)]
        assert np.all(np.diff(context) > 0), (t, s)
        mixed = [_predict(model, (t, s), [(1, 1024, True), (max(t - 1, 1), kv, False)])
                 for kv in (t, t + 1024, t + 4096)]
        assert np.all(np.diff(mixed) >= 0), (t, s)


def test_larger_buckets_cost_at_least_as_much(profile):
    _, model = profile
    buckets = _buckets(model)
    capacity = model.metadata["kv_capacity_tokens"]
    rng = np.random.default_rng(123)  # not the build seed: fresh contents
    for small in buckets.pairs():
        plans = vidur.synthetic_plans(small, buckets, 12, rng, 8192, capacity)
        for chunks in plans:
            feats = StepFeatures.of_chunks(chunks)
            base = model.predict(small, feats)
            for big in buckets.pairs():
                if big[0] >= small[0] and big[1] >= small[1]:
                    assert model.predict(big, feats) >= base * (1 - 1e-9), (small, big, chunks)


@needs_shared
def test_recipe_reproduces_readme_numbers():
    """Linear ops and measured pieces are exact lookups (2 %); the all-reduce is
    interpolated between noisy sizes (5 %); attention from the calibrated model (10 %)."""
    tolerance = {"modelled": 0.10, "all-reduce": 0.05}
    checks = vidur.readme_checks(SHARED)
    assert len(checks) >= 10
    for check in checks:
        tol = next((v for k, v in tolerance.items() if k in check["name"]), 0.02)
        assert check["rel_err"] <= tol, check
    by_name = {c["name"]: c for c in checks}
    assert by_name["A100 Llama-3-8B linear 512 tok ms/layer"]["got"] == pytest.approx(1.0825,
                                                                                       rel=0.02)


@needs_shared
def test_recipe_parts_and_calibration():
    recipe = vidur.GpuRecipe.from_shared("a100", "llama3-8b", SHARED)
    cal = recipe.attention
    assert cal.decode_error["mape"] < 0.15 and cal.prefill_error["mape"] < 0.12
    assert cal.prefill_error["mape"] < cal.prefill_single_slope_error["mape"]
    # Effective rates below the A100's peaks.
    assert 1e-9 / cal.decode[1] < vidur.DEVICES["a100"]["hbm_tb_s"]
    assert 1e-9 / min(cal.prefill[1:]) < vidur.DEVICES["a100"]["bf16_tflop_s"]
    # Padding: the same contents cost more on a bigger bucket; the linear part is the
    # measured layer sum at the bucket's tokens.
    chunks = [(1, 2048, True)] * 16 + [(200, 1000, False)]
    assert recipe.step_ms((256, 64), chunks) < recipe.step_ms((512, 64), chunks)
    assert recipe.layer_ms(512, chunks)["linear"] == pytest.approx(1.0825)
    # One ragged kernel (default) pays one attention floor per layer for a mixed step;
    # vidur's split kernels pay both. Pure steps are the same either way.
    split = vidur.GpuRecipe.from_shared("a100", "llama3-8b", SHARED,
                                              attention_kernels="split")
    # Here the smaller floor is the decode kernel's, which GQA batching scales by 1.1.
    assert cal.decode[0] < cal.prefill[0]
    assert split.attention_ms(chunks) - recipe.attention_ms(chunks) == pytest.approx(
        cal.decode[0] * (1 + vidur.GQA_BATCHING_OVERHEAD))
    for pure in ([(1, 2048, True)] * 16, [(300, 1000, False)]):
        assert split.attention_ms(pure) == pytest.approx(recipe.attention_ms(pure))
    # vidur's unpadded iteration: the measured layer at the exact tokens, no LM head.
    one = [(512, 512, False)]
    assert recipe.vidur_iteration_ms(one) == pytest.approx(
        32 * (1.0825 + split.attention_ms(one)))
    # H100 attention runs faster than A100's by at most the peak ratios.
    h100 = vidur.GpuRecipe.from_shared("h100", "llama2-7b", SHARED)
    a100 = vidur.GpuRecipe.from_shared("a100", "llama2-7b", SHARED)
    ratio = a100.attention_ms(chunks) / h100.attention_ms(chunks)
    assert 1.0 < ratio <= 989 / 312


@needs_shared
@pytest.mark.parametrize("name", NAMES)
def test_committed_json_is_reproducible(name):
    committed = LatencyModel.load(PROFILES_DIR / f"{name}.json")
    device, model_name = vidur.PROFILES[name]
    rebuilt, _ = vidur.build_profile(
        device, model_name, SHARED, seed=committed.metadata["synthetic_plans"]["seed"])
    assert sorted(rebuilt.coefficients) == sorted(committed.coefficients)
    for bucket, coef in committed.coefficients.items():
        np.testing.assert_allclose(rebuilt.coefficients[bucket], coef, rtol=1e-6, atol=1e-12,
                                   err_msg=f"{name} bucket {bucket}")
    assert rebuilt.heldout.mape == pytest.approx(committed.heldout.mape, rel=1e-6)
    assert rebuilt.metadata["kv_capacity_tokens"] == committed.metadata["kv_capacity_tokens"]
