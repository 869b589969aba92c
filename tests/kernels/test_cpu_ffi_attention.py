"""The C++ FFI ragged paged attention (``cpu_ffi``) against the reference and the oracle.

Every build this CPU can run is tested (``generic`` is the scalar code, ``avx2`` the
vector code), over the shapes where the kernel takes its own paths: head sizes that
are and are not multiples of the vector width, odd GQA groups, page sizes that are not
powers of two, contexts ending exactly at page and key-block (64) boundaries, scrambled
page tables, and batches large enough to be shared with XLA's thread pool. Batch
invariance is bitwise here: a token's result depends only on its own query, position
and keys. The build machinery (cache, lock, errors, ``auto`` fallback) is tested too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import fbjax_kernels.ragged_paged_attention as rpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import cpu_ffi, get_attention, reference_attention
from hypothesis import HealthCheck, given, settings

from .oracle import make_ragged_batch, oracle_attention
from .test_reference_attention import TOL, make_batch, ragged_batches

ffi = jax.jit(cpu_ffi.ragged_paged_attention,
              static_argnames=("sm_scale", "sliding_window", "soft_cap", "isa"))
reference = jax.jit(reference_attention, static_argnames=("sm_scale", "sliding_window",
                                                          "soft_cap"))
ISAS = cpu_ffi.supported_isas()
REF_TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # max abs difference to the reference
REPO = Path(__file__).resolve().parents[2]


def run(batch, isa=None, **kw) -> np.ndarray:
    return np.asarray(ffi(*batch.args, isa=isa, **kw))


def check(batch, isa=None, dtype="float32", **kw) -> np.ndarray:
    """cpu_ffi == reference (<= 1e-5 in float32) and == oracle; padding rows are zero."""
    out = run(batch, isa, **kw)
    assert out.shape == batch.q.shape
    assert out.dtype == batch.q.dtype
    real = batch.num_real_tokens
    ref = np.asarray(reference(*batch.args, **kw))
    np.testing.assert_allclose(out[:real].astype(np.float32), ref[:real].astype(np.float32),
                               rtol=0, atol=REF_TOL[dtype])
    expected = oracle_attention(*batch.args, **kw)
    np.testing.assert_allclose(out[:real].astype(np.float64), expected[:real],
                               rtol=TOL[dtype], atol=TOL[dtype])
    assert not np.any(out[real:].astype(np.float32))
    return out


def custom_batch(specs, *, seed=0, page_size=16, kv_heads=2, ratio=4, head_dim=32,
                 dtype=np.float32, max_seqs=None, num_tokens=None, pages_per_seq=None):
    """A batch of (q_len, kv_len) sequences over a shuffled page pool."""
    q_lens, kv_lens = zip(*specs, strict=True)
    pages = sum(-(-kv // page_size) for kv in kv_lens) + 3
    return make_ragged_batch(np.random.default_rng(seed), len(specs), q_lens, kv_lens,
                             page_size, pages, kv_heads, kv_heads * ratio, head_dim, dtype,
                             max_seqs=max_seqs or len(specs), num_tokens=num_tokens,
                             pages_per_seq=pages_per_seq)


# ----------------------------------------------------------------------------- results


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scenario", ["decode", "prefill", "mixed", "zero_q_len"])
def test_scenarios(scenario, dtype, isa):
    check(make_batch(scenario, dtype=dtype, extra_seqs=2, extra_tokens=5), isa, dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_chunks_with_a_cached_prefix(isa):
    specs = [(40, 300), (17, 64), (64, 128), (5, 200), (1, 90), (100, 101)]
    check(custom_batch(specs, num_tokens=240), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_contexts_ending_at_page_and_block_boundaries(isa):
    """kv_len (and the chunk start) exactly at page (16) and key block (64) edges."""
    specs = [(1, 16), (1, 32), (16, 16), (32, 64), (16, 48), (1, 64), (64, 128), (1, 63),
             (1, 65), (1, 129), (48, 192), (1, 1)]
    check(custom_batch(specs), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_scrambled_and_reversed_page_tables(isa):
    specs = [(1, 200), (70, 150), (1, 33)]
    batch = custom_batch(specs, seed=3)
    used = batch.page_indices[0, :13]
    assert np.any(np.diff(used) < 0)  # the pool really is shuffled
    check(batch, isa)
    for s, (_, kv) in enumerate(specs):  # same pages, each table back to front
        n = -(-kv // 16)
        batch.page_indices[s, :n] = batch.page_indices[s, :n][::-1].copy()
    check(batch, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head_dim", [8, 16, 20, 24, 32, 64, 128])
def test_head_dims(head_dim, isa):
    check(custom_batch([(1, 150), (37, 100), (20, 20)], head_dim=head_dim), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
def test_gqa_groups(ratio, isa):
    check(custom_batch([(1, 150), (37, 100), (20, 20)], ratio=ratio, kv_heads=2), isa)


@pytest.mark.parametrize("page_size", [1, 5, 16, 64, 128])
def test_page_sizes(page_size):
    check(custom_batch([(1, 150), (37, 100), (20, 20), (1, 128)], page_size=page_size))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("window", [0, 1, 7, 64, 100, 1000])
def test_sliding_window(window, isa):
    check(make_batch("mixed", extra_tokens=5), isa, sliding_window=window)


@pytest.mark.parametrize("isa", ISAS)
def test_soft_cap_window_and_scale(isa):
    check(make_batch("mixed", ratio=8, extra_seqs=1, extra_tokens=4), isa, soft_cap=3.0,
          sliding_window=40, sm_scale=0.3)
    check(make_batch("mixed"), isa, soft_cap=30.0, sm_scale=1.0)


def test_no_live_sequences_gives_zeros():
    batch = make_ragged_batch(np.random.default_rng(3), 0, [], [], 16, 4, 2, 4, 64,
                              np.float32, max_seqs=4, num_tokens=8)
    assert np.all(run(batch) == 0.0)


def test_float16_runs_through_xla():
    batch = make_batch("mixed", dtype="float32")
    args = [a.astype(np.float16) if a.dtype == np.float32 else a for a in batch.args]
    out = np.asarray(ffi(*args))
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), oracle_attention(*args), atol=2e-2)


@pytest.mark.parametrize("isa", ISAS)
def test_engine_like_batch_is_threaded_and_deterministic(isa):
    """Enough work to be shared with the intra-op pool; repeated calls agree bitwise."""
    specs = [(1, 200 + 13 * i) for i in range(30)] + [(120, 120), (90, 187)]
    batch = custom_batch(specs, max_seqs=40, num_tokens=256, pages_per_seq=128)
    first = check(batch, isa)
    for _ in range(3):
        assert np.array_equal(run(batch, isa), first)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_random_ragged_batches(params):
    q_lens, kv_lens, page_size, seed = params
    real = sum(q_lens)
    pages_per_seq = 2048 // page_size
    batch = make_ragged_batch(np.random.default_rng(seed), len(q_lens), q_lens, kv_lens,
                              page_size, 8 * pages_per_seq, 2, 8, 32, np.float32,
                              max_seqs=8, num_tokens=512 if real <= 512 else 2048,
                              pages_per_seq=pages_per_seq)
    check(batch)


# ------------------------------------------------------------- bitwise batch invariance


def _alone(batch, s: int, num_tokens: int | None = None) -> tuple:
    """Sequence ``s`` as a batch of its own (optionally padded), same cache and pages."""
    start, end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
    pad = 0 if num_tokens is None else num_tokens - (end - start)
    q = np.concatenate([batch.q[start:end], np.ones((pad, *batch.q.shape[1:]), batch.q.dtype)])
    return (q, batch.k_cache, batch.v_cache, batch.kv_lens[s:s + 1],
            batch.page_indices[s:s + 1], np.array([0, end - start], np.int32),
            np.asarray(1, np.int32))


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 50, "soft_cap": 20.0}])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sequence_alone_equals_sequence_in_batch_bitwise(dtype, kw):
    batch = make_batch("mixed", dtype=dtype, extra_seqs=2, extra_tokens=7)
    together = run(batch, **kw)
    for s in range(int(batch.num_seqs)):
        start, end = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
        alone = np.asarray(ffi(*_alone(batch, s), **kw))
        padded = np.asarray(ffi(*_alone(batch, s, num_tokens=1024), **kw))[: end - start]
        assert np.array_equal(alone, together[start:end]), f"sequence {s}"
        assert np.array_equal(padded, together[start:end]), f"sequence {s} (padded)"


@pytest.mark.parametrize("split", [1, 16, 63, 64, 65, 173])
def test_chunked_prefill_equals_single_chunk_bitwise(split):
    """Prefill in two chunks (the second reads the first from the cache) gives the same
    bits as one chunk, wherever the split falls relative to pages and key blocks."""
    rng = np.random.default_rng(11)
    prompt, page_size, kv_heads, q_heads, head_dim, num_pages = 300, 16, 2, 8, 64, 40
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = rng.standard_normal(shape, np.float32)  # the prompt's keys already written
    v_cache = rng.standard_normal(shape, np.float32)
    q = rng.standard_normal((prompt, q_heads, head_dim), np.float32)
    pages = rng.permutation(num_pages)[: -(-prompt // page_size)].astype(np.int32)[None]
    one = np.asarray(1, np.int32)

    def chunk(lo, hi):
        return np.asarray(ffi(q[lo:hi], k_cache, v_cache, np.array([hi], np.int32), pages,
                              np.array([0, hi - lo], np.int32), one))

    whole = chunk(0, prompt)
    assert np.array_equal(np.concatenate([chunk(0, split), chunk(split, prompt)]), whole)
    # and a decode of the last token sees exactly what its prefill row saw
    assert np.array_equal(chunk(prompt - 1, prompt), whole[-1:])


def test_no_cross_talk_between_sequences():
    batch = make_batch("mixed", extra_seqs=2, extra_tokens=7)
    base = run(batch)
    rng = np.random.default_rng(5)
    target = 0
    start, end = int(batch.cu_q_lens[target]), int(batch.cu_q_lens[target + 1])
    q = batch.q.copy()
    q[end:] = rng.standard_normal(q[end:].shape).astype(q.dtype)
    mine = set(batch.page_indices[target].tolist())
    k_cache = batch.k_cache.copy()
    others = [p for p in range(k_cache.shape[0]) if p not in mine]
    k_cache[others] = rng.standard_normal(k_cache[others].shape).astype(k_cache.dtype)
    args = list(batch.args)
    args[0], args[1] = q, k_cache
    out = np.asarray(ffi(*args))
    assert np.array_equal(out[start:end], base[start:end])
    assert not np.array_equal(out[end:batch.num_real_tokens], base[end:batch.num_real_tokens])


# ------------------------------------------------------------------- build and selection


def test_auto_picks_cpu_ffi_on_cpu():
    assert get_attention("cpu_ffi") is cpu_ffi.ragged_paged_attention
    if jax.default_backend() == "cpu":
        assert rpa.resolve_impl("auto") == "cpu_ffi"
        assert get_attention("auto") is cpu_ffi.ragged_paged_attention


def test_auto_falls_back_to_xla_with_a_warning(monkeypatch, caplog):
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks cpu_ffi only on CPU")

    def fail(isa=None):
        raise cpu_ffi.BuildError("no compiler here (test)")

    monkeypatch.setattr(cpu_ffi, "load", fail)
    rpa._cpu_ffi_for_auto.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert rpa.resolve_impl("auto") == "xla"
            assert get_attention("auto") is rpa.xla_attention
        assert "no compiler here (test)" in caplog.text
        assert "using xla" in caplog.text
        with pytest.raises(cpu_ffi.BuildError):  # asked for by name: an error
            get_attention("cpu_ffi")
    finally:
        rpa._cpu_ffi_for_auto.cache_clear()


def test_build_error_carries_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("FBJAX_FFI_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken_kernel.cc"
    broken.write_text("int f( { return undeclared_name; }\n")
    with pytest.raises(cpu_ffi.BuildError, match="broken_kernel.cc") as info:
        cpu_ffi.build("generic", source=broken)
    assert "error" in str(info.value)
    assert not list((tmp_path / "cache").glob("*.so*")), "no partial library is left"


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(cpu_ffi.BuildError, match="not found"):
        cpu_ffi.build("generic")


def test_unwritable_cache_is_a_build_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FBJAX_FFI_CACHE", str(blocker / "cache"))  # under a regular file
    with pytest.raises(cpu_ffi.BuildError, match="FBJAX_FFI_CACHE"):
        cpu_ffi.build("generic")


def test_forced_isa(monkeypatch):
    monkeypatch.setenv("FBJAX_FFI_ISA", "generic")
    assert cpu_ffi.default_isa() == "generic"
    monkeypatch.setenv("FBJAX_FFI_ISA", "avx9000")
    with pytest.raises(cpu_ffi.BuildError, match="avx9000"):
        cpu_ffi.default_isa()


def test_library_name_depends_on_source_and_flags(tmp_path):
    cxx = cpu_ffi._compiler()
    copy = tmp_path / "cpu_ffi.cc"
    copy.write_text(cpu_ffi.SOURCE.read_text() + "\n// changed\n")
    a = cpu_ffi._library_path(cxx, cpu_ffi.BASE_FLAGS, cpu_ffi.SOURCE)
    assert a == cpu_ffi._library_path(cxx, cpu_ffi.BASE_FLAGS, cpu_ffi.SOURCE)
    assert a != cpu_ffi._library_path(cxx, cpu_ffi.BASE_FLAGS + ("-mavx2",), cpu_ffi.SOURCE)
    assert a != cpu_ffi._library_path(cxx, cpu_ffi.BASE_FLAGS, copy)


def test_concurrent_builds_share_one_library(tmp_path):
    """Processes building into an empty cache at once wait for one another's build."""
    env = dict(os.environ, FBJAX_FFI_CACHE=str(tmp_path), PYTHONPATH=str(REPO))
    code = ("from fbjax_kernels.ragged_paged_attention import cpu_ffi; "
            "print(cpu_ffi.build('generic'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert [p.name for p in tmp_path.glob("*.so*")] == [Path(paths.pop()).name]


def test_vmap_runs_sequentially():
    """Under vmap each batch element is one call; the results are unchanged."""
    batch = custom_batch([(1, 40), (3, 20)], num_tokens=6)
    stacked = [jnp.stack([jnp.asarray(a)] * 2) for a in batch.args]
    out = jax.vmap(cpu_ffi.ragged_paged_attention)(*stacked)
    np.testing.assert_array_equal(np.asarray(out[1]), run(batch))
