"""Conformance: every ragged paged attention implementation against the NumPy oracle.

Each test is parameterized over the implementation table ``conformance.IMPLS``
(reference, xla, cpu_ffi per ISA, Pallas GPU and TPU in their interpreters) and over
shared case tables; each case has a level, and an implementation gets the cases its
level reaches (see ``conformance.py``). Backend-only tests (builds, lowering, tuning
internals, auto selection) live in the per-backend files.
"""

from __future__ import annotations

import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import get_attention
from hypothesis import HealthCheck, given, settings

from .conformance import (
    BAD_ARGS,
    CORE,
    DTYPES,
    EXHAUSTIVE,
    EXTRA,
    FULL,
    IMPLS,
    PROFILES,
    SCENARIOS,
    STANDARD,
    Case,
    alone,
    assert_matches_reference,
    bad_arguments,
    case,
    check,
    chunked_prefill_problem,
    impl_params,
    jit_write_kv,
    jitted,
    make_batch,
    no_live_sequences,
    params,
    ragged_batches,
    random_layouts,
    run,
    with_arrays,
)
from .oracle import oracle_attention


def build(c: Case):
    spec = dict(c["batch"])
    return make_batch(spec.pop("spec"), **spec)


def dtype_of(c: Case) -> str:
    return c["batch"].get("dtype", "float32")


def check_case(impl, c: Case) -> np.ndarray:
    return check(impl, build(c), dtype_of(c), **c.get("kw", {}))


# Odd sizes for the implementations that can afford many compilations.
ODD_SPECS = [(1, 150), (37, 100), (20, 20)]


# ----------------------------------------------------------------------------- scenarios


SCENARIO_CASES = [
    case(f"{name}-{dtype}", CORE if dtype == "float32" or name == "mixed" else STANDARD,
         batch={"spec": name, "dtype": dtype})
    for name in SCENARIOS for dtype in DTYPES
] + [
    # chunks after cached prefixes of all sizes
    case("chunks_after_a_cached_prefix", EXHAUSTIVE,
         batch={"spec": [(40, 300), (17, 64), (64, 128), (5, 200), (1, 90), (100, 101)],
                "head_dim": 32, "spare_pages": 3, "extra_tokens": 13}),
    # kv_len (and the chunk start) exactly at page (16) and key block (64) edges
    case("contexts_ending_at_page_and_block_edges", EXHAUSTIVE,
         batch={"spec": [(1, 16), (1, 32), (16, 16), (32, 64), (16, 48), (1, 64), (64, 128),
                         (1, 63), (1, 65), (1, 129), (48, 192), (1, 1)],
                "head_dim": 32, "spare_pages": 3}),
]


@pytest.mark.parametrize(("impl", "case"), params(SCENARIO_CASES))
def test_scenarios(impl, case):
    check_case(impl, case)


PADDING_CASES = [
    # max_seqs > num_seqs (padding rows: q_len 0, kv_len 0) and padding tokens at the end
    case(f"mixed-{dtype}", CORE,
         batch={"spec": "mixed", "dtype": dtype, "extra_seqs": 3, "extra_tokens": 29})
    for dtype in DTYPES
] + [
    case(f"{name}-{dtype}-pad2x5", EXHAUSTIVE,
         batch={"spec": name, "dtype": dtype, "extra_seqs": 2, "extra_tokens": 5})
    for name in SCENARIOS for dtype in DTYPES
]


@pytest.mark.parametrize(("impl", "case"), params(PADDING_CASES))
def test_padding_sequences_and_trailing_tokens(impl, case):
    batch = build(case)
    pad = case["batch"]["extra_tokens"]
    assert batch.num_real_tokens == batch.q.shape[0] - pad
    out = check(impl, batch, dtype_of(case))
    assert np.all(out[-pad:].astype(np.float32) == 0.0)


@pytest.mark.parametrize("impl", impl_params())
def test_no_live_sequences_gives_zeros(impl):
    out = run(impl, no_live_sequences())
    assert out.shape == (8, 4, 64)
    assert np.all(out == 0.0)


# ------------------------------------------------------------------ shapes and options


SHAPE_CASES = [
    case(f"page{page_size}-gqa{ratio}",
         CORE if (page_size, ratio) in ((16, 1), (32, 8), (64, 4)) else STANDARD,
         batch={"spec": "mixed", "page_size": page_size, "ratio": ratio,
                "seed": page_size + ratio})
    for page_size in (16, 32, 64) for ratio in (1, 4, 8)
] + [
    # page sizes that are not powers of two, and one-token pages
    case(f"page{page_size}-odd", EXHAUSTIVE,
         batch={"spec": [*ODD_SPECS, (1, 128)], "page_size": page_size, "head_dim": 32,
                "spare_pages": 3})
    for page_size in (1, 5, 16, 64, 128)
] + [
    # odd GQA groups
    case(f"gqa{ratio}-odd", EXHAUSTIVE,
         batch={"spec": ODD_SPECS, "ratio": ratio, "head_dim": 32, "spare_pages": 3})
    for ratio in (1, 2, 3, 4, 8)
]


@pytest.mark.parametrize(("impl", "case"), params(SHAPE_CASES))
def test_page_sizes_and_gqa(impl, case):
    check_case(impl, case)


HEAD_DIM_CASES = [
    case(f"128-{dtype}", CORE, batch={"spec": "mixed", "head_dim": 128, "kv_heads": 1,
                                      "dtype": dtype, "extra_tokens": 3})
    for dtype in DTYPES
] + [
    # head sizes that are and are not multiples of a vector width
    case(f"{head_dim}-odd", EXHAUSTIVE,
         batch={"spec": ODD_SPECS, "head_dim": head_dim, "spare_pages": 3})
    for head_dim in (8, 16, 20, 24, 32, 64, 128)
]


@pytest.mark.parametrize(("impl", "case"), params(HEAD_DIM_CASES))
def test_head_dims(impl, case):
    check_case(impl, case)


UNPADDED_CASES = [
    # head_dim 80, 7 q heads per kv head and 24-token pages: none a power of two (the
    # Pallas GPU kernel pads its tiles to 128 lanes and 8-head groups, and masks)
    case("hd80-group7-page24", STANDARD,
         batch={"spec": [(9, 40), (1, 50), (4, 4)], "seed": 4, "page_size": 24,
                "kv_heads": 1, "ratio": 7, "head_dim": 80, "spare_pages": 2,
                "extra_seqs": 1, "extra_tokens": 2},
         kw={"sliding_window": 30}),
]


@pytest.mark.parametrize(("impl", "case"), params(UNPADDED_CASES))
def test_unpadded_shapes_are_masked(impl, case):
    check_case(impl, case)


def _tuning_params():
    return [pytest.param(impl, dict(kw), id=f"{impl.name}-{name}")
            for impl in IMPLS for name, kw in impl.tunings]


@pytest.mark.parametrize(("impl", "tuning"), _tuning_params())
def test_tuning_knobs_do_not_change_the_result(impl, tuning):
    check(impl, make_batch("mixed", extra_seqs=1, extra_tokens=3), "float32", **tuning)


_WINDOW_LEVELS = {
    ("float32", 1): CORE, ("float32", 7): CORE, ("bfloat16", 50): CORE,
    # window 2: the decodes at positions 128 and 256 see keys 127 and 255, each the last
    # key of a 64-key tile
    ("float32", 2): STANDARD, ("float32", 40): STANDARD, ("float32", 1000): STANDARD,
    ("bfloat16", 7): STANDARD,
    ("float32", 64): FULL, ("float32", 100): FULL,
    ("bfloat16", 1): EXTRA, ("bfloat16", 64): EXTRA, ("bfloat16", 100): EXTRA,
    ("bfloat16", 1000): EXTRA,
    # a window of no key: zeros (the Pallas kernels reject it, see the bad options)
    ("float32", 0): EXHAUSTIVE,
}
WINDOW_CASES = [
    case(f"{window}-{dtype}", level,
         batch={"spec": "mixed", "dtype": dtype, "extra_tokens": 5},
         kw={"sliding_window": window})
    for (dtype, window), level in sorted(_WINDOW_LEVELS.items(), key=lambda x: x[0][1])
]


@pytest.mark.parametrize(("impl", "case"), params(WINDOW_CASES))
def test_sliding_window(impl, case):
    check_case(impl, case)


_SOFT_CAP_LEVELS = {
    ("float32", 1.0): CORE, ("bfloat16", 5.0): CORE, ("float32", 30.0): STANDARD,
    ("float32", 5.0): EXTRA, ("bfloat16", 1.0): EXTRA, ("bfloat16", 30.0): EXTRA,
}
SOFT_CAP_CASES = [
    # sm_scale = 1 makes scores ~N(0, head_dim), so the cap is active
    case(f"{soft_cap}-{dtype}", level, batch={"spec": "mixed", "dtype": dtype},
         kw={"soft_cap": soft_cap, "sm_scale": 1.0})
    for (dtype, soft_cap), level in sorted(_SOFT_CAP_LEVELS.items(), key=lambda x: x[0][1])
]


@pytest.mark.parametrize(("impl", "case"), params(SOFT_CAP_CASES))
def test_soft_cap(impl, case):
    check_case(impl, case)


COMBINED_CASES = [
    case("mixed", CORE,
         batch={"spec": "mixed", "ratio": 8, "extra_seqs": 1, "extra_tokens": 4},
         kw={"soft_cap": 3.0, "sliding_window": 40, "sm_scale": 0.3}),
    case("zero_q_len", STANDARD,
         batch={"spec": "zero_q_len", "ratio": 8, "extra_seqs": 1, "extra_tokens": 4},
         kw={"soft_cap": 3.0, "sliding_window": 20, "sm_scale": 0.3}),
]


@pytest.mark.parametrize(("impl", "case"), params(COMBINED_CASES))
def test_soft_cap_with_sliding_window_and_sm_scale(impl, case):
    check_case(impl, case)


REFERENCE_CASES = [
    case(f"{name}-{dtype}", level,
         batch={"spec": "mixed", "dtype": dtype, "extra_seqs": 3, "extra_tokens": 29}, kw=kw)
    for name, level, kw in (("plain", CORE, {}),
                            ("window_cap", STANDARD, {"sliding_window": 50, "soft_cap": 20.0}))
    for dtype in DTYPES
]


@pytest.mark.parametrize(("impl", "case"),
                         params(REFERENCE_CASES, where=lambda impl: bool(impl.ref_tol)))
def test_matches_reference(impl, case):
    # the whole output, padding included, within the implementation's declared tolerance
    batch, kw = build(case), case.get("kw", {})
    assert_matches_reference(impl, batch, run(impl, batch, **kw), dtype_of(case), **kw)


@pytest.mark.parametrize("impl", impl_params())
def test_page_table_past_the_context_is_ignored(impl):
    # Entries past a sequence's last page (and padding rows) hold ids no cache has (vLLM
    # leaves such slots stale); they must not change the result or fault.
    batch = make_batch("mixed")  # the shapes of test_scenarios[mixed]: no recompilation
    page_size = batch.k_cache.shape[1]
    table = batch.page_indices.copy()
    for s in range(table.shape[0]):
        table[s, -(-int(batch.kv_lens[s]) // page_size):] = 10**6
    check(impl, with_arrays(batch, page_indices=table))


@pytest.mark.parametrize(
    ("impl", "case"),
    params([case(dtype, level, batch={"dtype": dtype})
            for dtype, level in (("float32", CORE), ("bfloat16", FULL))]),
)
def test_no_cross_talk_between_sequences(impl, case):
    """Same shapes, other neighbours: a sequence's output is bitwise unchanged when every
    other sequence's queries and context pages are replaced."""
    batch = make_batch("mixed", dtype=dtype_of(case), extra_seqs=3, extra_tokens=29)
    base = run(impl, batch)
    rng = np.random.default_rng(5)
    page_size = batch.k_cache.shape[1]
    for target in (0, 1, 4):  # a chunk with a prefix, a decode, a chunk with a prefix
        start, end = int(batch.cu_q_lens[target]), int(batch.cu_q_lens[target + 1])
        q = batch.q.copy()
        noise = rng.standard_normal(q.shape).astype(q.dtype)
        q[:start], q[end:] = noise[:start], noise[end:]
        owned = -(-int(batch.kv_lens[target]) // page_size)
        mine = set(batch.page_indices[target, :owned].tolist())
        others = [p for p in range(batch.k_cache.shape[0]) if p not in mine]
        k_cache, v_cache = batch.k_cache.copy(), batch.v_cache.copy()
        k_cache[others] = rng.standard_normal(k_cache[others].shape).astype(k_cache.dtype)
        v_cache[others] = rng.standard_normal(v_cache[others].shape).astype(v_cache.dtype)
        out = run(impl, with_arrays(batch, q=q, k_cache=k_cache, v_cache=v_cache))
        assert np.array_equal(out[start:end], base[start:end]), f"sequence {target}"
        others_rows = np.r_[0:start, end:batch.num_real_tokens]
        assert not np.array_equal(out[others_rows], base[others_rows])  # the others did


@pytest.mark.parametrize(("impl", "case"), params([case("reversed", EXHAUSTIVE)]))
def test_scrambled_and_reversed_page_tables(impl, case):
    specs = [(1, 200), (70, 150), (1, 33)]
    batch = make_batch(specs, seed=3, head_dim=32, spare_pages=3)
    assert np.any(np.diff(batch.page_indices[0, :13]) < 0)  # the pool really is shuffled
    check(impl, batch)
    table = batch.page_indices.copy()
    for s, (_, kv) in enumerate(specs):  # same pages, each table back to front
        n = -(-kv // 16)
        table[s, :n] = table[s, :n][::-1]
    check(impl, with_arrays(batch, page_indices=table))


# -------------------------------------------------------------------- batch invariance


CHUNK_CASES = [case("split173", STANDARD, split=173)] + [
    # splits at and around page (16) and key block (64) edges
    case(f"split{split}", EXHAUSTIVE, split=split) for split in (1, 16, 63, 64, 65)
]


@pytest.mark.parametrize(("impl", "case"), params(CHUNK_CASES))
def test_chunked_prefill_matches_single_chunk(impl, case):
    """A prompt prefilled in two chunks (write_kv puts each chunk's K/V in the cache, the
    second chunk reads the first from it) equals the prompt in one go; bitwise where the
    implementation is bitwise batch-invariant, and then a decode of the last token sees
    exactly what its prefill row saw."""
    q, k, v, k_cache, v_cache, page_indices, slots = chunked_prefill_problem()
    prompt, split = q.shape[0], case["split"]
    one = np.asarray(1, np.int32)
    attention = jitted(impl)

    def step(k_cache, v_cache, lo, hi):
        k_cache, v_cache = jit_write_kv(k_cache, v_cache, k[lo:hi], v[lo:hi], slots[lo:hi])
        out = attention(q[lo:hi], k_cache, v_cache, np.array([hi], np.int32), page_indices,
                        np.array([0, hi - lo], np.int32), one)
        return k_cache, v_cache, np.asarray(out)

    _, _, whole = step(k_cache, v_cache, 0, prompt)
    k1, v1, first = step(k_cache, v_cache, 0, split)
    k2, v2, second = step(k1, v1, split, prompt)
    chunked = np.concatenate([first, second])
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    if impl.bitwise:
        assert np.array_equal(chunked, whole)
        assert np.array_equal(step(k2, v2, prompt - 1, prompt)[2], whole[-1:])

    want = oracle_attention(q, np.asarray(k2), np.asarray(v2), np.array([prompt]),
                            page_indices, np.array([0, prompt]), 1)
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5)


# Each sequence alone is another program: for xla, ~14 s of compilation a case, so the
# window + soft-cap mix (each option has its own xla cases) starts one level up.
INVARIANCE_CASES = [
    case(f"{dtype}-{name}", level, batch={"dtype": dtype}, kw=kw)
    for dtype in DTYPES
    for name, level, kw in (("plain", FULL, {}),
                            ("window_cap", EXTRA, {"sliding_window": 50, "soft_cap": 20.0}))
]


@pytest.mark.parametrize(("impl", "case"), params(INVARIANCE_CASES))
def test_sequence_alone_equals_sequence_in_batch(impl, case):
    """A sequence run alone (another bucket, another program), alone in a padded bucket,
    and batched with others: bitwise equal where the implementation says so, else within
    a few ulps (the sums may round differently on other shapes)."""
    dtype, kw = dtype_of(case), case["kw"]
    batch = make_batch("mixed", dtype=dtype, extra_seqs=3, extra_tokens=29)
    together = run(impl, batch, **kw)
    atol = None if impl.bitwise else dict(impl.invariance_atol)[dtype]

    def same(got, want, msg):
        if atol is None:
            assert np.array_equal(got, want), msg
        else:
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                       rtol=0, atol=atol, err_msg=msg)

    for s in range(int(batch.num_seqs)):
        start, end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
        same(run(impl, alone(batch, s), **kw), together[start:end], f"sequence {s} differs")
        padded = run(impl, alone(batch, s, num_tokens=1024), **kw)[: end - start]
        same(padded, together[start:end], f"sequence {s} differs (padded)")


# ----------------------------------------------------------------------- property based


@pytest.mark.parametrize("impl", impl_params())
def test_random_ragged_batches(impl):
    profile = PROFILES[impl.profile]
    layouts = random_layouts(impl, profile)
    if not layouts:
        pytest.skip(f"{impl.name} supports none of the {impl.profile} profile's layouts")

    @settings(max_examples=impl.max_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ragged_batches(profile, layouts))
    def random_batch_matches_the_oracle(drawn):
        batch, kw = drawn
        check(impl, batch, "float32", **kw)

    random_batch_matches_the_oracle()


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("impl", "bad"),
    [pytest.param(impl, bad, id=f"{impl.name}-{bad}") for impl in IMPLS for bad in BAD_ARGS],
)
def test_bad_arguments_raise_value_error(impl, bad):
    name, args = bad_arguments(bad)
    with pytest.raises(ValueError, match=f"'{name}'"):
        impl.call(**args)
    with pytest.raises(ValueError, match=f"'{name}'"):  # also while tracing under jit
        jitted(impl)(**args)


@pytest.mark.parametrize(
    ("impl", "option", "value", "match"),
    [pytest.param(impl, option, value, match, id=f"{impl.name}-{option}={value}")
     for impl in IMPLS for option, value, match in impl.bad_options],
)
def test_bad_options_raise_value_error(impl, option, value, match):
    with pytest.raises(ValueError, match=match):
        impl.call(*make_batch("decode").args, **{option: value})


@pytest.mark.parametrize("impl", impl_params())
def test_registered(impl):
    assert get_attention(impl.registry) is impl.fn

