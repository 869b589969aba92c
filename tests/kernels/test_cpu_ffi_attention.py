"""``cpu_ffi``-only tests: the C++ FFI kernel's build machinery (cache, lock, errors,
forced ISA), ``auto`` selection and its fallback, float16 through ``xla``, threading
and vmap. Its results (every ISA this CPU runs, bitwise batch invariance included) are
checked in ``test_conformance.py``.
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
from fbjax_kernels.ragged_paged_attention import cpu_ffi, get_attention

from .conformance import BY_NAME, CPU_FFI, CPU_ISAS, check, jitted, make_batch, run
from .oracle import oracle_attention

REPO = Path(__file__).resolve().parents[2]


def test_float16_runs_through_xla():
    batch = make_batch("mixed", dtype="float32")
    args = [a.astype(np.float16) if a.dtype == np.float32 else a for a in batch.args]
    out = np.asarray(jitted(CPU_FFI)(*args))
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), oracle_attention(*args), atol=2e-2)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_engine_like_batch_is_threaded_and_deterministic(isa):
    """Enough work to be shared with the intra-op pool; repeated calls agree bitwise."""
    impl = BY_NAME[f"cpu_ffi-{isa}"]
    specs = [(1, 200 + 13 * i) for i in range(30)] + [(120, 120), (90, 187)]
    batch = make_batch(specs, head_dim=32, spare_pages=3, extra_seqs=40 - len(specs),
                       extra_tokens=256 - sum(q for q, _ in specs), pages_per_seq=128)
    first = check(impl, batch)
    for _ in range(3):
        assert np.array_equal(run(impl, batch), first)


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
    batch = make_batch([(1, 40), (3, 20)], head_dim=32, spare_pages=3, extra_tokens=2)
    stacked = [jnp.stack([jnp.asarray(a)] * 2) for a in batch.args]
    out = jax.vmap(cpu_ffi.ragged_paged_attention)(*stacked)
    np.testing.assert_array_equal(np.asarray(out[1]), run(CPU_FFI, batch))
