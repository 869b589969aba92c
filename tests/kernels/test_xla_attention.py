"""The CPU-oriented ``xla`` ragged paged attention against the NumPy oracle.

Same scenarios as the reference's tests, plus the shapes where ``xla`` takes its own
paths: buckets larger than one self tile (sequences crossing tiles), decodes and
prefix-carrying chunks in one batch, chunk query blocks of several sizes, and long
cached prefixes.
"""

from __future__ import annotations

import fbjax_kernels.ragged_paged_attention.xla as xla_module
import jax
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import get_attention, reference_attention
from fbjax_kernels.ragged_paged_attention import xla_attention as xla_fn
from hypothesis import HealthCheck, given, settings

from .oracle import make_ragged_batch, oracle_attention
from .test_reference_attention import (
    SCENARIOS,
    TOL,
    make_batch,
    ragged_batches,
)

STATIC = ("sm_scale", "sliding_window", "soft_cap", "kv_block_tokens", "q_block")
attention = jax.jit(xla_fn, static_argnames=STATIC)
reference = jax.jit(reference_attention, static_argnames=STATIC)


def run(batch, **kw) -> np.ndarray:
    return np.asarray(attention(*batch.args, **kw))


def check(batch, dtype: str = "float32", **kw) -> np.ndarray:
    out = run(batch, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k not in ("kv_block_tokens", "q_block")}
    expected = oracle_attention(*batch.args, **oracle_kw)
    assert out.shape == batch.q.shape
    assert out.dtype == batch.q.dtype
    real = batch.num_real_tokens
    np.testing.assert_allclose(out[:real].astype(np.float64), expected[:real],
                               rtol=TOL[dtype], atol=TOL[dtype])
    assert not np.any(out[real:].astype(np.float32))  # padding tokens: exact zeros
    return out


def custom_batch(specs, *, seed=0, page_size=16, kv_heads=2, ratio=4, head_dim=32,
                 max_seqs=None, num_tokens=None, pages_per_seq=None):
    """A batch of (q_len, kv_len) sequences."""
    q_lens, kv_lens = zip(*specs, strict=True)
    pages = sum(-(-kv // page_size) for kv in kv_lens) + 3
    return make_ragged_batch(np.random.default_rng(seed), len(specs), q_lens, kv_lens,
                             page_size, pages, kv_heads, kv_heads * ratio, head_dim,
                             np.float32, max_seqs=max_seqs or len(specs),
                             num_tokens=num_tokens, pages_per_seq=pages_per_seq)


def test_registered():
    assert get_attention("xla") is xla_fn


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenarios(scenario, dtype):
    check(make_batch(scenario, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_sequences_and_trailing_tokens(dtype):
    batch = make_batch("mixed", dtype=dtype, extra_seqs=3, extra_tokens=29)
    check(batch, dtype)


def test_no_live_sequences_gives_zeros():
    batch = make_ragged_batch(np.random.default_rng(3), 0, [], [], 16, 4, 2, 4, 64,
                              np.float32, max_seqs=4, num_tokens=8)
    assert np.all(run(batch) == 0.0)


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_page_sizes_and_gqa(page_size, ratio):
    check(make_batch("mixed", page_size=page_size, ratio=ratio, seed=page_size))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims(head_dim):
    check(make_batch("mixed", head_dim=head_dim, extra_tokens=3))


@pytest.mark.parametrize("kv_block_tokens", [16, 64, 256])
@pytest.mark.parametrize("q_block", [1, 5, 16, 64])
def test_kv_and_chunk_block_sizes(kv_block_tokens, q_block):
    check(make_batch("mixed", extra_seqs=1, extra_tokens=6), kv_block_tokens=kv_block_tokens,
          q_block=q_block)


@pytest.mark.parametrize("window", [1, 7, 64, 100, 1000])
def test_sliding_window(window):
    check(make_batch("mixed", extra_tokens=5), sliding_window=window)


@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
def test_soft_cap(soft_cap):
    check(make_batch("mixed"), soft_cap=soft_cap, sm_scale=1.0)


def test_soft_cap_with_sliding_window_and_sm_scale():
    check(make_batch("mixed", ratio=8, extra_seqs=1, extra_tokens=4), soft_cap=3.0,
          sliding_window=40, sm_scale=0.3)


@pytest.mark.parametrize("window", [None, 90])
def test_many_self_tiles(window):
    """Buckets of several self tiles: prompts crossing tile edges, a chunk with a long
    prefix, decodes, an idle sequence, and padding, in a bucket that is not a whole
    number of tiles."""
    specs = [(1, 400), (150, 150), (3, 3), (0, 50), (97, 700), (1, 1), (60, 60), (1, 65)]
    tokens = sum(q for q, _ in specs)
    batch = custom_batch(specs, max_seqs=10, num_tokens=tokens + 2 * xla_module.SELF_TILE + 5)
    check(batch, sliding_window=window)


def test_decode_groups_and_chunk_groups_loop():
    """More decodes than one decode group and more chunk blocks than one chunk group."""
    specs = [(1, 10 + 37 * i) for i in range(xla_module.DECODE_GROUP + 5)]
    specs += [(40, 300), (23, 90), (70, 71)]
    check(custom_batch(specs, seed=4))


def test_matches_reference_on_an_engine_like_batch():
    specs = [(1, 200 + 13 * i) for i in range(24)] + [(120, 120), (90, 187)]
    batch = custom_batch(specs, max_seqs=32, num_tokens=256, pages_per_seq=128)
    np.testing.assert_allclose(run(batch), np.asarray(reference(*batch.args)),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_random_ragged_batches(params):
    q_lens, kv_lens, page_size, seed = params
    real = sum(q_lens)
    pages_per_seq = 2048 // page_size
    batch = make_ragged_batch(np.random.default_rng(seed), len(q_lens), q_lens, kv_lens,
                              page_size, 8 * pages_per_seq, 2, 4, 64, np.float32,
                              max_seqs=8, num_tokens=512 if real <= 512 else 2048,
                              pages_per_seq=pages_per_seq)
    check(batch)


# Batch invariance, cross-talk and chunked prefill are tested for both jnp
# implementations in test_reference_attention.py (parameterized by implementation).
