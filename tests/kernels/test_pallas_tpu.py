"""The Pallas Mosaic TPU ragged paged attention kernel against the NumPy oracle.

On a CPU host the kernel runs in the Mosaic TPU interpreter (it simulates HBM, VMEM,
DMAs and semaphores, and fills fresh buffers with NaNs), so shapes stay small: every
distinct shape or static option costs a compilation of about a second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import get_attention, reference_attention
from fbjax_kernels.ragged_paged_attention.tpu import ragged_paged_attention as tpu_attention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from .oracle import RaggedBatch, make_ragged_batch, oracle_attention, pages_needed

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STATIC = ("sm_scale", "sliding_window", "soft_cap", "kv_block_tokens", "q_block",
          "kv_heads_block", "interpret")

attention = jax.jit(tpu_attention, static_argnames=STATIC)
reference = jax.jit(reference_attention, static_argnames=STATIC[:5])

# (q_len, kv_len) per sequence.
SCENARIOS = {
    "decode": [(1, 1), (1, 17), (1, 100), (1, 129), (1, 300)],
    "prefill": [(37, 37), (5, 5), (128, 128)],
    # prefill chunks after a cached prefix, a fresh prompt and decodes
    "mixed": [(40, 200), (1, 129), (33, 33), (1, 1), (20, 70), (1, 257)],
    # live sequences with no query tokens this step, between and around others
    "zero_q_len": [(0, 40), (12, 60), (0, 0), (1, 77), (0, 200), (9, 9)],
}


def make_batch(
    scenario: str,
    *,
    seed: int = 0,
    page_size: int = 16,
    kv_heads: int = 2,
    ratio: int = 4,
    head_dim: int = 64,
    dtype: str = "float32",
    extra_seqs: int = 0,
    extra_tokens: int = 0,
) -> RaggedBatch:
    q_lens, kv_lens = zip(*SCENARIOS[scenario], strict=True)
    num_pages = pages_needed(kv_lens, page_size) + 3  # a few pages nobody owns
    return make_ragged_batch(
        np.random.default_rng(seed), len(q_lens), q_lens, kv_lens, page_size, num_pages,
        kv_heads, kv_heads * ratio, head_dim, DTYPES[dtype],
        max_seqs=len(q_lens) + extra_seqs, num_tokens=sum(q_lens) + extra_tokens,
    )


def check(batch: RaggedBatch, dtype: str, **kw) -> np.ndarray:
    """Kernel vs oracle on real tokens; exact zeros on padding tokens."""
    out = np.asarray(attention(*batch.args, **kw))
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    oracle_kw = {k: kw[k] for k in ("sm_scale", "sliding_window", "soft_cap") if k in kw}
    expected = oracle_attention(*batch.args, **oracle_kw)
    real = batch.num_real_tokens
    tol = TOL[dtype]
    np.testing.assert_allclose(out[:real].astype(np.float64), expected[:real], rtol=tol,
                               atol=tol)
    assert not np.any(out[real:].astype(np.float32))
    return out


# ----------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize(
    ("scenario", "dtype"),
    [(name, "float32") for name in SCENARIOS] + [("mixed", "bfloat16")],
)
def test_scenarios(scenario, dtype):
    check(make_batch(scenario, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_sequences_and_trailing_tokens_match_reference(dtype):
    # max_seqs > num_seqs (padding rows) and padding tokens after cu_q_lens[num_seqs]
    batch = make_batch("mixed", dtype=dtype, extra_seqs=2, extra_tokens=13)
    out = check(batch, dtype)
    assert np.all(out[-13:].astype(np.float32) == 0.0)
    ref = np.asarray(reference(*batch.args)).astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_no_live_sequences_gives_zeros():
    batch = make_ragged_batch(np.random.default_rng(3), 0, [], [], 16, 4, 2, 4, 64,
                              jnp.float32, max_seqs=3, num_tokens=5)
    out = np.asarray(attention(*batch.args))
    assert out.shape == (5, 4, 64) and np.all(out == 0.0)


@pytest.mark.parametrize(("page_size", "ratio"),
                         [(16, 1), (32, 8), (64, 4)])
def test_page_sizes_and_gqa(page_size, ratio):
    check(make_batch("mixed", page_size=page_size, ratio=ratio, seed=page_size + ratio),
          "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_dim_128(dtype):
    check(make_batch("mixed", head_dim=128, kv_heads=1, dtype=dtype, extra_tokens=3), dtype)


@pytest.mark.parametrize(("window", "dtype"), [(1, "float32"), (7, "float32"),
                                               (50, "bfloat16")])
def test_sliding_window(window, dtype):
    check(make_batch("mixed", dtype=dtype, extra_tokens=5), dtype, sliding_window=window)


@pytest.mark.parametrize(("soft_cap", "dtype"), [(1.0, "float32"), (5.0, "bfloat16")])
def test_soft_cap(soft_cap, dtype):
    # sm_scale = 1 makes scores ~N(0, head_dim), so the cap is active
    check(make_batch("mixed", dtype=dtype), dtype, soft_cap=soft_cap, sm_scale=1.0)


def test_soft_cap_with_sliding_window_and_sm_scale():
    check(make_batch("mixed", ratio=8, extra_seqs=1, extra_tokens=4), "float32",
          soft_cap=3.0, sliding_window=40, sm_scale=0.3)


@pytest.mark.parametrize(
    "tuning",
    [{"kv_block_tokens": 16}, {"kv_block_tokens": 64, "q_block": 1},
     {"kv_block_tokens": 1024, "q_block": 7, "kv_heads_block": 1}],
    ids=["one_page_blocks", "one_token_q_blocks", "big_blocks_one_head_per_step"],
)
def test_tuning_knobs_do_not_change_the_result(tuning):
    check(make_batch("mixed", extra_seqs=1, extra_tokens=3), "float32",
          sliding_window=90, **tuning)


def test_page_table_past_the_context_is_ignored():
    # Entries past a sequence's last page (and padding rows) hold ids no cache has (vLLM
    # leaves such slots stale); they must not change the result or fault.
    batch = make_batch("mixed")  # the shapes of test_scenarios[mixed]: no recompilation
    page_size = batch.k_cache.shape[1]
    table = batch.page_indices.copy()
    for s in range(table.shape[0]):
        table[s, -(-int(batch.kv_lens[s]) // page_size):] = 10**6
    batch.page_indices = table
    check(batch, "float32")


def test_no_races_in_double_buffering():
    """The interpreter's race detector sees no DMA overwriting a slot still being read."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interp
    except ImportError:  # private module; moved in another jax version
        pytest.skip("no TPU interpreter race detector in this jax")
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    batch = make_batch("mixed", extra_tokens=2)
    check(batch, "float32", kv_block_tokens=32, interpret=params)
    races = getattr(interp, "races", None)
    if races is None:
        pytest.skip("race detector state not exposed")
    assert not races.races_found


def test_registered_as_pallas_tpu():
    assert get_attention("pallas_tpu") is tpu_attention


# ----------------------------------------------------------------------- property based


@st.composite
def ragged_batches(draw):
    num_seqs = draw(st.integers(1, 4))
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "prefill", "chunk", "idle"]))
        if kind == "decode":
            q_len, prefix = 1, draw(st.integers(0, 300))
        elif kind == "prefill":
            q_len, prefix = draw(st.integers(1, 40)), 0
        elif kind == "chunk":
            q_len, prefix = draw(st.integers(1, 40)), draw(st.integers(1, 260))
        else:
            q_len, prefix = 0, draw(st.integers(0, 300))
        q_lens.append(q_len)
        kv_lens.append(prefix + q_len)
    page_size = draw(st.sampled_from([16, 32]))
    seed = draw(st.integers(0, 2**32 - 1))
    return q_lens, kv_lens, page_size, seed


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_random_ragged_batches(params):
    q_lens, kv_lens, page_size, seed = params
    # Fixed padded shapes per page size keep the number of compilations small; the pool
    # is shuffled and larger than needed, so page ids are scattered.
    pages_per_seq = 384 // page_size
    batch = make_ragged_batch(
        np.random.default_rng(seed), len(q_lens), q_lens, kv_lens, page_size,
        4 * pages_per_seq + 3, 2, 4, 64, jnp.float32, max_seqs=4, num_tokens=160,
        pages_per_seq=pages_per_seq)
    check(batch, "float32")


# ---------------------------------------------------------------------------- validation


def _args(batch: RaggedBatch) -> dict:
    names = ("q", "k_cache", "v_cache", "kv_lens", "page_indices", "cu_q_lens", "num_seqs")
    return dict(zip(names, batch.args, strict=True))


BAD_ARGS = {
    "q_2d": ("q", lambda a: a["q"][:, 0, :]),
    "q_int": ("q", lambda a: a["q"].astype(np.int32)),
    "q_heads_not_multiple": ("q", lambda a: a["q"][:, :3, :]),
    "k_cache_int8": ("k_cache", lambda a: a["k_cache"].astype(np.int8)),
    "k_cache_head_dim": ("k_cache", lambda a: a["k_cache"][..., :32]),  # v_cache too
    "v_cache_shape": ("v_cache", lambda a: a["v_cache"][:-1]),
    "kv_lens_float": ("kv_lens", lambda a: a["kv_lens"].astype(np.float32)),
    "page_indices_rows": ("page_indices", lambda a: a["page_indices"][:-1]),
    "cu_q_lens_length": ("cu_q_lens", lambda a: a["cu_q_lens"][:-1]),
    "num_seqs_vector": ("num_seqs", lambda a: np.array([1, 2], np.int32)),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_value_error(case):
    name, corrupt = BAD_ARGS[case]
    args = _args(make_batch("decode"))
    args[name] = corrupt(args)
    if case == "k_cache_head_dim":
        args["v_cache"] = args["v_cache"][..., :32]
    with pytest.raises(ValueError, match=f"'{name}'"):
        tpu_attention(**args)
    with pytest.raises(ValueError, match=f"'{name}'"):  # also while tracing under jit
        attention(**args)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"kv_heads_block": 3}, "kv_heads_block"), ({"q_block": 0}, "q_block"),
     ({"sliding_window": 0}, "sliding_window")],
)
def test_bad_tuning_arguments_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        tpu_attention(*make_batch("decode").args, **kw)
