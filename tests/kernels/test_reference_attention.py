"""The jax.numpy ragged paged attention reference against the naive NumPy oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import (
    cpu_ffi,
    reference_attention,
    write_kv,
    xla_attention,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .oracle import RaggedBatch, make_ragged_batch, oracle_attention, pages_needed

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# One jitted reference; jit caches one executable per shape and static option set.
attention = jax.jit(
    reference_attention,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_block_tokens"),
)
jit_write_kv = jax.jit(write_kv)
# The implementations whose batch-invariance tests live here (the Pallas kernels'
# interpreters are too slow for these shapes; their files test invariance their way).
JITTED = {
    "reference": attention,
    "xla": jax.jit(xla_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                                   "kv_block_tokens", "q_block")),
    "cpu_ffi": jax.jit(cpu_ffi.ragged_paged_attention,
                       static_argnames=("sm_scale", "sliding_window", "soft_cap")),
}


# (q_len, kv_len) per sequence for each scenario.
SCENARIOS = {
    "decode": [(1, 1), (1, 17), (1, 128), (1, 129), (1, 300)],
    "prefill": [(37, 37), (128, 128), (5, 5), (200, 200)],
    # prefill chunks that follow a cached prefix, a fresh prompt, and decodes
    "mixed": [(50, 300), (1, 129), (33, 33), (1, 1), (70, 96), (1, 257)],
    # real sequences with no query tokens this step, between and around others
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
    rng = np.random.default_rng(seed)
    num_pages = pages_needed(kv_lens, page_size) + 5  # a few pages nobody owns
    return make_ragged_batch(
        rng,
        len(q_lens),
        q_lens,
        kv_lens,
        page_size,
        num_pages,
        kv_heads,
        kv_heads * ratio,
        head_dim,
        DTYPES[dtype],
        max_seqs=len(q_lens) + extra_seqs,
        num_tokens=sum(q_lens) + extra_tokens,
    )


def run(batch: RaggedBatch, impl: str = "reference", **kw) -> np.ndarray:
    return np.asarray(JITTED[impl](*batch.args, **kw))


def check_against_oracle(batch: RaggedBatch, dtype: str, **kw) -> np.ndarray:
    out = run(batch, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k != "kv_block_tokens"}
    expected = oracle_attention(*batch.args, **oracle_kw)
    assert out.shape == batch.q.shape
    assert out.dtype == batch.q.dtype
    real = batch.num_real_tokens
    tol = TOL[dtype]
    np.testing.assert_allclose(
        out[:real].astype(np.float64), expected[:real], rtol=tol, atol=tol
    )
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
    batch = make_batch("mixed", dtype=dtype, extra_seqs=3, extra_tokens=29)
    assert batch.num_real_tokens == batch.q.shape[0] - 29
    out = check_against_oracle(batch, dtype)
    assert np.all(out[-29:].astype(np.float32) == 0.0)


def test_no_live_sequences_gives_zeros():
    rng = np.random.default_rng(3)
    batch = make_ragged_batch(rng, 0, [], [], 16, 4, 2, 4, 64, jnp.float32,
                              max_seqs=4, num_tokens=8)
    out = run(batch)
    assert out.shape == (8, 4, 64)
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


@pytest.mark.parametrize("kv_block_tokens", [16, 64, 256])
def test_kv_block_sizes(kv_block_tokens):
    # the block size changes only the summation order, never the result
    check_against_oracle(make_batch("mixed", page_size=16), "float32",
                         kv_block_tokens=kv_block_tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [1, 7, 64, 100, 1000])
def test_sliding_window(window, dtype):
    check_against_oracle(make_batch("mixed", dtype=dtype, extra_tokens=5), dtype,
                         sliding_window=window)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("soft_cap", [1.0, 5.0, 30.0])
def test_soft_cap(soft_cap, dtype):
    # sm_scale = 1 makes scores ~N(0, head_dim), so the cap is active
    check_against_oracle(make_batch("mixed", dtype=dtype), dtype, soft_cap=soft_cap,
                         sm_scale=1.0)


def test_soft_cap_with_sliding_window_and_sm_scale():
    check_against_oracle(make_batch("mixed", ratio=8, extra_seqs=1, extra_tokens=4),
                         "float32", soft_cap=3.0, sliding_window=40, sm_scale=0.3)


# ----------------------------------------------------------------------- property based


@st.composite
def ragged_batches(draw):
    num_seqs = draw(st.integers(1, 8))
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "prefill", "chunk", "idle"]))
        if kind == "decode":
            q_len, prefix = 1, draw(st.integers(0, 1999))
        elif kind == "prefill":
            q_len, prefix = draw(st.integers(1, 300)), 0
        elif kind == "chunk":
            q_len, prefix = draw(st.integers(1, 300)), draw(st.integers(1, 1700))
        else:
            q_len, prefix = 0, draw(st.integers(0, 2000))
        q_lens.append(q_len)
        kv_lens.append(prefix + q_len)
    page_size = draw(st.sampled_from([16, 32, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    return q_lens, kv_lens, page_size, seed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_random_ragged_batches(params):
    q_lens, kv_lens, page_size, seed = params
    # Fixed padded shapes per page size keep the number of compilations small.
    real = sum(q_lens)
    num_tokens = 512 if real <= 512 else 2048
    pages_per_seq = 2048 // page_size
    batch = make_ragged_batch(
        np.random.default_rng(seed),
        len(q_lens),
        q_lens,
        kv_lens,
        page_size,
        8 * pages_per_seq,
        2,
        4,
        64,
        jnp.float32,
        max_seqs=8,
        num_tokens=num_tokens,
        pages_per_seq=pages_per_seq,
    )
    check_against_oracle(batch, "float32")


# ------------------------------------------------------------------------------ write_kv


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_write_kv(cache_dtype):
    rng = np.random.default_rng(7)
    num_pages, page_size, kv_heads, head_dim = 6, 16, 2, 64
    num_slots = num_pages * page_size
    dtype = DTYPES[cache_dtype]
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = rng.standard_normal(shape, np.float32).astype(dtype)
    v_cache = rng.standard_normal(shape, np.float32).astype(dtype)
    live = rng.choice(num_slots, size=20, replace=False)
    pad = np.array([num_slots, num_slots, num_slots + 1, 10 * num_slots])
    slots = np.concatenate([live[:11], pad[:2], live[11:], pad[2:]]).astype(np.int32)
    new_k = rng.standard_normal((len(slots), kv_heads, head_dim), np.float32)
    new_v = rng.standard_normal((len(slots), kv_heads, head_dim), np.float32)

    k_out, v_out = jit_write_kv(k_cache, v_cache, new_k, new_v, slots)
    assert k_out.shape == shape and k_out.dtype == dtype and v_out.dtype == dtype

    for cache, new, out in ((k_cache, new_k, k_out), (v_cache, new_v, v_out)):
        flat_in = cache.reshape(num_slots, kv_heads, head_dim)
        flat_out = np.asarray(out).reshape(num_slots, kv_heads, head_dim)
        written = slots < num_slots
        # written slots hold the new values (cast to the cache dtype)
        np.testing.assert_array_equal(flat_out[slots[written]], new[written].astype(dtype))
        # every other slot, including what padding tokens would have hit, is unchanged
        untouched = np.ones(num_slots, bool)
        untouched[slots[written]] = False
        np.testing.assert_array_equal(flat_out[untouched], flat_in[untouched])


def test_write_kv_only_padding_leaves_cache_unchanged():
    rng = np.random.default_rng(8)
    shape = (3, 16, 1, 64)
    k_cache = rng.standard_normal(shape, np.float32)
    v_cache = rng.standard_normal(shape, np.float32)
    slots = np.full(5, 3 * 16, np.int32)
    new = np.ones((5, 1, 64), np.float32)
    k_out, v_out = write_kv(jnp.asarray(k_cache), jnp.asarray(v_cache), new, new, slots)
    np.testing.assert_array_equal(np.asarray(k_out), k_cache)
    np.testing.assert_array_equal(np.asarray(v_out), v_cache)


def test_batch_slot_mapping_addresses_the_sequence_pages():
    # make_ragged_batch's slot_mapping points each token at its own position's page slot
    batch = make_batch("mixed", extra_tokens=4)
    new = np.zeros((batch.q.shape[0], 2, 64), np.float32)
    k_out, _ = jit_write_kv(batch.k_cache, batch.v_cache, new, new, batch.slot_mapping)
    k_out = np.asarray(k_out)
    page_size = batch.k_cache.shape[1]
    for s in range(int(batch.num_seqs)):
        q_len, kv_len = int(batch.q_lens[s]), int(batch.kv_lens[s])
        for pos in range(kv_len):
            page = batch.page_indices[s, pos // page_size]
            is_new = pos >= kv_len - q_len
            assert np.all(k_out[page, pos % page_size] == 0.0) == is_new


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
    "page_indices_1d": ("page_indices", lambda a: a["page_indices"][:, 0]),
    "page_indices_float": ("page_indices", lambda a: a["page_indices"].astype(np.float32)),
    "cu_q_lens_length": ("cu_q_lens", lambda a: a["cu_q_lens"][:-1]),
    "cu_q_lens_float": ("cu_q_lens", lambda a: a["cu_q_lens"].astype(np.float32)),
    "num_seqs_vector": ("num_seqs", lambda a: np.array([1, 2], np.int32)),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_value_error(case):
    name, corrupt = BAD_ARGS[case]
    args = _args(make_batch("mixed"))
    args[name] = corrupt(args)
    if case == "k_cache_head_dim":
        args["v_cache"] = args["v_cache"][..., :32]
    with pytest.raises(ValueError, match=f"'{name}'"):
        reference_attention(**args)
    with pytest.raises(ValueError, match=f"'{name}'"):  # also while tracing under jit
        attention(**args)


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("new_k", lambda a: {**a, "new_k": a["new_k"][:, :, :32]}),
        ("new_v", lambda a: {**a, "new_v": a["new_v"][:-1]}),
        ("v_cache", lambda a: {**a, "v_cache": a["v_cache"][:-1]}),
        ("slot_mapping", lambda a: {**a, "slot_mapping": a["slot_mapping"].astype(np.float32)}),
    ],
)
def test_write_kv_bad_arguments(name, corrupt):
    cache = np.zeros((4, 16, 2, 64), np.float32)
    args = {
        "k_cache": cache,
        "v_cache": cache,
        "new_k": np.zeros((5, 2, 64), np.float32),
        "new_v": np.zeros((5, 2, 64), np.float32),
        "slot_mapping": np.arange(5, dtype=np.int32),
    }
    with pytest.raises(ValueError, match=f"'{name}'"):
        write_kv(**corrupt(args))


# ----------------------------------------------------------------------- batch invariance


def _alone(batch: RaggedBatch, s: int, num_tokens: int | None = None) -> RaggedBatch:
    """Sequence ``s`` of ``batch`` as a batch of one over the same cache and pages,
    optionally followed by padding tokens up to ``num_tokens``."""
    start, end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    pad = 0 if num_tokens is None else num_tokens - (end - start)
    q = np.concatenate([batch.q[start:end], np.ones((pad, *batch.q.shape[1:]), batch.q.dtype)])
    num_slots = batch.k_cache.shape[0] * batch.k_cache.shape[1]
    return RaggedBatch(
        q=q,
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        kv_lens=batch.kv_lens[s:s + 1],
        page_indices=batch.page_indices[s:s + 1],
        cu_q_lens=np.array([0, end - start], np.int32),
        num_seqs=np.asarray(1, np.int32),
        q_lens=batch.q_lens[s:s + 1],
        slot_mapping=np.concatenate(
            [batch.slot_mapping[start:end], np.full(pad, num_slots, np.int32)]
        ),
    )


# Alone vs batched runs on other shapes (query blocks of another length, another
# program), so the float32 sums may round differently: equal to a few ulps, not bits.
INVARIANCE_TOL = {"float32": 2e-6, "bfloat16": 1e-2}


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 50, "soft_cap": 20.0}],
                         ids=["plain", "window_cap"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", sorted(JITTED))
def test_sequence_alone_equals_sequence_in_batch(impl, dtype, kw):
    batch = make_batch("mixed", dtype=dtype, extra_seqs=2, extra_tokens=7)
    together = run(batch, impl, **kw).astype(np.float32)
    tol = INVARIANCE_TOL[dtype]
    for s in range(int(batch.num_seqs)):
        start, end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
        alone = run(_alone(batch, s), impl, **kw).astype(np.float32)
        np.testing.assert_allclose(alone, together[start:end], rtol=0, atol=tol,
                                   err_msg=f"sequence {s} differs")
        # alone but in a larger padded bucket (another token count, another program)
        padded = run(_alone(batch, s, num_tokens=1024), impl, **kw)[: end - start]
        np.testing.assert_allclose(padded.astype(np.float32), together[start:end], rtol=0,
                                   atol=tol, err_msg=f"sequence {s} differs (padded)")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", sorted(JITTED))
def test_no_cross_talk_between_sequences(impl, dtype):
    """Same shapes, other neighbours: a sequence's output is bitwise unchanged when every
    other sequence's queries and context pages are replaced."""
    batch = make_batch("mixed", dtype=dtype, extra_seqs=2, extra_tokens=7)
    base = run(batch, impl)
    rng = np.random.default_rng(5)
    for target in (0, 1, 4):  # a chunk with a prefix, a decode, a chunk with a prefix
        start, end = int(batch.cu_q_lens[target]), int(batch.cu_q_lens[target + 1])
        q = np.asarray(batch.q).copy()
        noise = rng.standard_normal(q.shape).astype(q.dtype)
        q[:start], q[end:] = noise[:start], noise[end:]
        mine = set(np.asarray(batch.page_indices)[target].tolist())
        k_cache = np.asarray(batch.k_cache).copy()
        others = [p for p in range(k_cache.shape[0]) if p not in mine]
        k_cache[others] = rng.standard_normal(k_cache[others].shape).astype(k_cache.dtype)
        args = list(batch.args)
        args[0], args[1] = q, k_cache
        out = np.asarray(JITTED[impl](*args))
        assert np.array_equal(out[start:end], base[start:end]), f"sequence {target}"
        others_rows = np.r_[0:start, end:batch.num_real_tokens]
        assert not np.array_equal(out[others_rows], base[others_rows])  # the others did


@pytest.mark.parametrize("impl", sorted(JITTED))
def test_chunked_prefill_matches_single_chunk(impl):
    rng = np.random.default_rng(11)
    prompt, split, page_size, kv_heads, q_heads, head_dim = 300, 173, 16, 2, 8, 64
    num_pages = 40
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
        out = JITTED[impl](q[lo:hi], k_cache, v_cache, np.array([hi], np.int32), page_indices,
                        np.array([0, hi - lo], np.int32), one)
        return k_cache, v_cache, np.asarray(out)

    _, _, whole = step(cache_k, cache_v, 0, prompt)
    k1, v1, first = step(cache_k, cache_v, 0, split)
    k2, v2, second = step(k1, v1, split, prompt)
    chunked = np.concatenate([first, second])
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)

    expected = oracle_attention(q, np.asarray(k2), np.asarray(v2), np.array([prompt]),
                                page_indices, np.array([0, prompt]), 1)
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5)

