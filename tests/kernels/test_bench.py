"""The kernel benchmark's arithmetic (what scripts/bench_kernels.py and stage 3 of
scripts/device_check.py report): minimum work per shape, interpreter detection, the
share of the HBM peak, and a failing implementation as a row rather than the end."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention.bench import (
    Shape,
    Timing,
    bench_shape,
    interpreted,
    work,
)

DECODE = Shape("decode 2 x 32", (1, 1), (32, 16), 4, 2, 16)


def test_work_counts_kv_bytes_and_causal_flops():
    kv_bytes, flops = work(DECODE, 2)
    assert kv_bytes == 2 * (32 + 16) * 2 * 16 * 2  # K and V, kv heads, head dim, bf16
    assert flops == 4 * (32 + 16) * 4 * 16  # one query each sees its whole context
    prefill = Shape("prefill", (3,), (3,), 1, 1, 1)
    assert work(prefill, 4)[1] == 4 * (1 + 2 + 3)  # causal: 1, 2, 3 visible keys


@pytest.mark.parametrize(("impl", "backend", "expected"), [
    ("pallas_gpu", "gpu", False), ("pallas_gpu", "cpu", True), ("pallas_gpu", "tpu", True),
    ("pallas_tpu", "tpu", False), ("pallas_tpu", "gpu", True), ("reference", "cpu", False),
])
def test_interpreted_off_the_kernels_own_platform(impl, backend, expected):
    assert interpreted(impl, backend) is expected


def test_peak_share_only_for_decode_and_a_known_peak():
    t = Timing("d", "x", 1e-3, 2e9, 1e9, decode=True)
    assert t.kv_gbs == pytest.approx(2000.0)
    assert t.peak_share(4.0) == pytest.approx(0.5)
    assert t.peak_share(None) is None
    assert Timing("p", "x", 1e-3, 2e9, 1e9, decode=False).peak_share(4.0) is None


def test_bench_shape_times_the_reference_and_reports_a_failure_as_a_row():
    rows = list(bench_shape(DECODE, ["no_such_impl", "reference"], jnp.float32, 1,
                            np.random.default_rng(0)))
    assert [r.impl for r in rows] == ["reference", "no_such_impl"]  # the reference first
    ref, bad = rows
    assert ref.error is None and ref.seconds > 0 and ref.vs_reference == 1.0
    assert "no_such_impl" in bad.error and math.isnan(bad.seconds)
