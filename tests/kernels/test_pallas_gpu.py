"""The Pallas GPU (Triton) ragged paged attention kernel against the NumPy oracle.

On a machine without a GPU the kernel runs in the generic Pallas interpreter
(``interpret`` defaults to True off GPU), which checks its logic; one test also lowers
it for CUDA (to Triton IR; no GPU needed) to check that it is a valid Triton kernel.
The interpreter is slow, so shapes are small: short contexts, two kv heads, a handful
of sequences. Each distinct shape / option set costs one compilation (~1 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import get_attention, reference_attention, write_kv
from fbjax_kernels.ragged_paged_attention.gpu import ragged_paged_attention as gpu_attention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .oracle import RaggedBatch, make_ragged_batch, oracle_attention, pages_needed

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STATIC = ("sm_scale", "sliding_window", "soft_cap", "kv_block_tokens", "q_block",
          "num_warps", "num_stages")

attention = jax.jit(gpu_attention, static_argnames=STATIC)
reference = jax.jit(reference_attention, static_argnames=("sm_scale", "sliding_window",
                                                          "soft_cap"))
jit_write_kv = jax.jit(write_kv)

# (q_len, kv_len) per sequence; small contexts that still span several key tiles
# (64 keys by default) and several pages, with partial last pages and tiles.
SCENARIOS = {
    "decode": [(1, 1), (1, 17), (1, 64), (1, 65), (1, 150)],
    "prefill": [(37, 37), (5, 5), (70, 70)],
    # prompt chunks after a cached prefix, a fresh prompt, decodes
    "mixed": [(20, 150), (1, 65), (17, 17), (1, 1), (30, 48), (1, 129)],
    # real sequences with no query tokens this step, between and around others
    "zero_q_len": [(0, 40), (12, 60), (0, 0), (1, 77), (0, 100), (9, 9)],
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
    rng = np.random.default_rng(seed)
    return make_ragged_batch(
        rng,
        len(q_lens),
        q_lens,
        kv_lens,
        page_size,
        pages_needed(kv_lens, page_size) + 3,  # a few pages nobody owns
        kv_heads,
        kv_heads * ratio,
        head_dim,
        DTYPES[dtype],
        max_seqs=len(q_lens) + extra_seqs,
        num_tokens=sum(q_lens) + extra_tokens,
    )


def check_against_oracle(batch: RaggedBatch, dtype: str, **kw) -> np.ndarray:
    out = np.asarray(attention(*batch.args, **kw))
    oracle_kw = {k: kw[k] for k in ("sm_scale", "sliding_window", "soft_cap") if k in kw}
    expected = oracle_attention(*batch.args, **oracle_kw)
    assert out.shape == batch.q.shape
    assert out.dtype == batch.q.dtype
    real = batch.num_real_tokens
    tol = TOL[dtype]
    np.testing.assert_allclose(out[:real].astype(np.float64), expected[:real], rtol=tol,
                               atol=tol)
    # padding tokens past cu_q_lens[num_seqs] get exact zeros
    assert not np.any(out[real:].astype(np.float32))
    return out


# ----------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenarios(scenario, dtype):
    check_against_oracle(make_batch(scenario, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_sequences_and_trailing_tokens(dtype):
    # max_seqs > num_seqs (padding rows: q_len 0, kv_len 0) and padding tokens at the end
    batch = make_batch("mixed", dtype=dtype, extra_seqs=2, extra_tokens=13)
    out = check_against_oracle(batch, dtype)
    assert np.all(out[-13:].astype(np.float32) == 0.0)


def test_no_live_sequences_gives_zeros():
    batch = make_ragged_batch(np.random.default_rng(3), 0, [], [], 16, 4, 2, 4, 64,
                              jnp.float32, max_seqs=3, num_tokens=5)
    out = np.asarray(attention(*batch.args))
    assert out.shape == (5, 4, 64)
    assert np.all(out == 0.0)


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_page_sizes_and_gqa(page_size, ratio):
    check_against_oracle(make_batch("mixed", page_size=page_size, ratio=ratio, seed=page_size),
                         "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims(head_dim, dtype):
    check_against_oracle(make_batch("mixed", head_dim=head_dim, dtype=dtype, extra_tokens=3),
                         dtype)


def test_unpadded_shapes_are_masked():
    # head_dim 80, 7 q heads per kv head and 24-token pages: none a power of two, so the
    # kernel pads its tiles (128 lanes, 8-head groups) and masks the padding
    batch = make_ragged_batch(np.random.default_rng(4), 3, [9, 1, 4], [40, 50, 4], 24, 8,
                              1, 7, 80, jnp.float32, max_seqs=4, num_tokens=16)
    check_against_oracle(batch, "float32", sliding_window=30)


@pytest.mark.parametrize(
    "kw",
    [{"kv_block_tokens": 16}, {"kv_block_tokens": 128}, {"q_block": 1}, {"q_block": 3},
     {"q_block": 32, "kv_block_tokens": 32, "num_warps": 8, "num_stages": 3}],
    ids=["k16", "k128", "q1", "q3", "q32_k32"],
)
def test_tile_sizes(kw):
    # tile sizes change only the work split and the summation order, never the result
    check_against_oracle(make_batch("mixed", extra_tokens=2), "float32", **kw)


@pytest.mark.parametrize(
    ("window", "dtype"),
    [(1, "float32"), (2, "float32"), (40, "float32"), (1000, "float32"), (7, "bfloat16")],
)
def test_sliding_window(window, dtype):
    # window 2: the decode at position 64 sees key 63, the last key of the first tile
    check_against_oracle(make_batch("mixed", dtype=dtype, extra_tokens=5), dtype,
                         sliding_window=window)


@pytest.mark.parametrize(("soft_cap", "dtype"),
                         [(1.0, "float32"), (30.0, "float32"), (5.0, "bfloat16")])
def test_soft_cap(soft_cap, dtype):
    # sm_scale = 1 makes scores ~N(0, head_dim), so the cap is active
    check_against_oracle(make_batch("mixed", dtype=dtype), dtype, soft_cap=soft_cap,
                         sm_scale=1.0)


def test_soft_cap_with_sliding_window_and_sm_scale():
    check_against_oracle(make_batch("zero_q_len", ratio=8, extra_seqs=1, extra_tokens=4),
                         "float32", soft_cap=3.0, sliding_window=20, sm_scale=0.3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_reference(dtype):
    batch = make_batch("mixed", dtype=dtype, extra_seqs=1, extra_tokens=3)
    kw = {"sliding_window": 50, "soft_cap": 20.0}
    out = np.asarray(attention(*batch.args, **kw)).astype(np.float32)
    ref = np.asarray(reference(*batch.args, **kw)).astype(np.float32)
    # float32: both sum in float32 in other orders; bfloat16: the kernel rounds the
    # softmax weights to bfloat16 for the p @ V matmul, the reference does not
    tol = {"float32": 2e-6, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)


def test_chunked_prefill_with_write_kv():
    # the companion write_kv puts this step's K/V in the cache; a prompt prefilled in
    # two chunks (the second after a cached prefix) equals the prompt in one go
    rng = np.random.default_rng(11)
    prompt, split, page_size, kv_heads, q_heads, head_dim = 90, 53, 16, 2, 8, 64
    num_pages = 9
    shape = (num_pages, page_size, kv_heads, head_dim)
    cache_k = jnp.asarray(rng.standard_normal(shape, np.float32))  # stale data everywhere
    cache_v = jnp.asarray(rng.standard_normal(shape, np.float32))
    q = rng.standard_normal((prompt, q_heads, head_dim), np.float32)
    k = rng.standard_normal((prompt, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((prompt, kv_heads, head_dim), np.float32)
    pages = rng.permutation(num_pages)[: -(-prompt // page_size)].astype(np.int32)
    page_indices = pages[None, :]
    pos = np.arange(prompt)
    slots = (pages[pos // page_size] * page_size + pos % page_size).astype(np.int32)
    one = np.asarray(1, np.int32)

    def step(k_cache, v_cache, lo, hi):
        k_cache, v_cache = jit_write_kv(k_cache, v_cache, k[lo:hi], v[lo:hi], slots[lo:hi])
        out = attention(q[lo:hi], k_cache, v_cache, np.array([hi], np.int32), page_indices,
                        np.array([0, hi - lo], np.int32), one)
        return k_cache, v_cache, np.asarray(out)

    _, _, whole = step(cache_k, cache_v, 0, prompt)
    k1, v1, first = step(cache_k, cache_v, 0, split)
    k2, v2, second = step(k1, v1, split, prompt)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-6, atol=1e-6)
    expected = oracle_attention(q, np.asarray(k2), np.asarray(v2), np.array([prompt]),
                                page_indices, np.array([0, prompt]), 1)
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5)


def test_no_cross_talk_between_sequences():
    """Same shapes, other neighbours: a sequence's output is bitwise unchanged when
    every other sequence's queries and context pages are replaced."""
    batch = make_batch("mixed", extra_seqs=1, extra_tokens=3)
    base = np.asarray(attention(*batch.args))
    rng = np.random.default_rng(5)
    target = 4  # a prompt chunk after a cached prefix
    start, end = int(batch.cu_q_lens[target]), int(batch.cu_q_lens[target + 1])
    q = batch.q.copy()
    noise = rng.standard_normal(q.shape).astype(np.float32)
    q[:start], q[end:] = noise[:start], noise[end:]
    mine = set(batch.page_indices[target, : -(-int(batch.kv_lens[target]) // 16)].tolist())
    others = [p for p in range(batch.k_cache.shape[0]) if p not in mine]
    k_cache, v_cache = batch.k_cache.copy(), batch.v_cache.copy()
    k_cache[others] = rng.standard_normal(k_cache[others].shape)
    v_cache[others] = rng.standard_normal(v_cache[others].shape)
    args = list(batch.args)
    args[:3] = q, k_cache, v_cache
    out = np.asarray(attention(*args))
    assert np.array_equal(out[start:end], base[start:end])
    assert not np.array_equal(out[:start], base[:start])  # the others did change


def test_registered_and_interprets_off_gpu():
    assert get_attention("pallas_gpu") is gpu_attention
    batch = make_batch("decode")
    # eager call, explicit interpret flag: same answer as the jitted default
    out = gpu_attention(*batch.args, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(attention(*batch.args)))


@pytest.mark.parametrize(
    ("dtype", "head_dim", "ratio", "kw"),
    [("float32", 64, 4, {}),
     ("bfloat16", 80, 7, {"sliding_window": 9, "soft_cap": 5.0, "num_warps": 8})],
    ids=["f32", "bf16_window_cap_unpadded"],
)
def test_lowers_to_triton(dtype, head_dim, ratio, kw):
    # Lowering for CUDA needs no GPU: it checks that every op in the kernel has a Triton
    # lowering and the tiles have legal (power of two) shapes.
    batch = make_ragged_batch(np.random.default_rng(0), 2, [3, 1], [40, 17], 16, 8, 2,
                              2 * ratio, head_dim, DTYPES[dtype], max_seqs=3, num_tokens=6)
    fn = jax.jit(functools.partial(gpu_attention, interpret=False, **kw))
    text = fn.trace(*batch.args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    assert f"num_warps = {kw.get('num_warps', 4)} : i32" in text


# ----------------------------------------------------------------------- property based


@st.composite
def ragged_batches(draw):
    num_seqs = draw(st.integers(1, 4))
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "prefill", "chunk", "idle"]))
        if kind == "decode":
            q_len, prefix = 1, draw(st.integers(0, 150))
        elif kind == "prefill":
            q_len, prefix = draw(st.integers(1, 24)), 0
        elif kind == "chunk":
            q_len, prefix = draw(st.integers(1, 24)), draw(st.integers(1, 120))
        else:
            q_len, prefix = 0, draw(st.integers(0, 150))
        q_lens.append(q_len)
        kv_lens.append(prefix + q_len)
    page_size = draw(st.sampled_from([16, 32]))
    window = draw(st.sampled_from([None, 2, 33]))
    seed = draw(st.integers(0, 2**32 - 1))
    return q_lens, kv_lens, page_size, window, seed


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_random_ragged_batches(params):
    # fixed padded shapes per page size (few compilations); make_ragged_batch shuffles
    # the page pool, so each sequence's pages are scattered over the cache
    q_lens, kv_lens, page_size, window, seed = params
    pages_per_seq = 192 // page_size
    batch = make_ragged_batch(
        np.random.default_rng(seed), len(q_lens), q_lens, kv_lens, page_size,
        4 * pages_per_seq, 2, 4, 64, jnp.float32, max_seqs=4, num_tokens=100,
        pages_per_seq=pages_per_seq,
    )
    check_against_oracle(batch, "float32", sliding_window=window)


# ---------------------------------------------------------------------------- validation


def _args(batch: RaggedBatch) -> dict:
    return dict(zip(
        ("q", "k_cache", "v_cache", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"),
        batch.args,
        strict=True,
    ))


BAD_ARGS = {
    "q_2d": ("q", lambda a: a["q"][:, 0, :]),
    "q_int": ("q", lambda a: a["q"].astype(np.int32)),
    "q_heads_not_multiple": ("q", lambda a: a["q"][:, :3, :]),
    "k_cache_int": ("k_cache", lambda a: a["k_cache"].astype(np.int8)),
    "k_cache_3d": ("k_cache", lambda a: a["k_cache"][0]),
    "k_cache_head_dim": ("k_cache", lambda a: a["k_cache"][..., :32]),  # v_cache too
    "v_cache_shape": ("v_cache", lambda a: a["v_cache"][:-1]),
    "v_cache_int": ("v_cache", lambda a: a["v_cache"].astype(np.int32)),
    "kv_lens_2d": ("kv_lens", lambda a: a["kv_lens"][:, None]),
    "kv_lens_float": ("kv_lens", lambda a: a["kv_lens"].astype(np.float32)),
    "page_indices_first_dim": ("page_indices", lambda a: a["page_indices"][:-1]),
    "page_indices_float": ("page_indices", lambda a: a["page_indices"].astype(np.float32)),
    "cu_q_lens_length": ("cu_q_lens", lambda a: a["cu_q_lens"][:-1]),
    "cu_q_lens_float": ("cu_q_lens", lambda a: a["cu_q_lens"].astype(np.float32)),
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
        gpu_attention(**args)
    with pytest.raises(ValueError, match=f"'{name}'"):  # also while tracing under jit
        attention(**args)


@pytest.mark.parametrize(
    ("name", "value"),
    [("sliding_window", 0), ("soft_cap", 0.0), ("soft_cap", -1.0), ("kv_block_tokens", 0),
     ("q_block", 0), ("num_warps", 0), ("sm_scale", float("nan"))],
)
def test_bad_options_raise_value_error(name, value):
    with pytest.raises(ValueError, match=f"'{name}'"):
        gpu_attention(*make_batch("decode").args, **{name: value})
