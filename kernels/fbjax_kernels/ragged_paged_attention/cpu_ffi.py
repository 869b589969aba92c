"""Ragged paged attention for CPU as a C++ XLA FFI kernel (``cpu_ffi.cc``).

Same signature and results (up to float rounding) as
:mod:`~fbjax_kernels.ragged_paged_attention.reference`. XLA on CPU copies every K/V page it
gathers through the page table; the C++ kernel reads the pages in place, which is most
of a decode step's attention time.

The shared library is compiled with the system C++ compiler (``$CXX`` or ``g++``) on
first use into ``$FBJAX_FFI_CACHE`` (default ``$XDG_CACHE_HOME/fbjax/ffi`` or
``~/.cache/fbjax/ffi``), named by a hash of the source, the jax version, the compiler
and its flags, so a stale or foreign binary is never loaded. Builds take a file lock
and rename into place, so concurrent processes don't race.

Vector code is a per-ISA build (see ``ISAS``), never ``-march=native``: the default is
the best level this CPU reports, and the level is part of the hash and of the FFI
target's name, so a cache directory shared between machines stays correct.
``$FBJAX_FFI_ISA`` forces a lower level.

:func:`load` registers the FFI target; it must run before an executable that calls it
is compiled or loaded from the persistent compilation cache, which is why
``get_attention("cpu_ffi")`` calls it, not only tracing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fbjax_kernels.ragged_paged_attention.validation import check_attention_args

# Package data beside this module (listed in pyproject.toml), so a wheel carries it.
SOURCE = Path(str(importlib.resources.files(__package__).joinpath("cpu_ffi.cc")))
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-fast-math", "-w")
# ISA level -> (extra compiler flags, /proc/cpuinfo flags it needs); best last.
ISAS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "generic": ((), frozenset()),
    "avx2": (("-mavx2", "-mfma"), frozenset({"avx2", "fma"})),
    "avx512": (("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"),
               frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})),
}


class BuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """Instruction set flags of this CPU (Linux x86 only; empty elsewhere)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_isas() -> list[str]:
    """ISA levels this CPU can run, worst to best."""
    return [isa for isa, (_, needs) in ISAS.items() if needs <= _cpu_flags()]


def default_isa() -> str:
    """``$FBJAX_FFI_ISA`` if set, else the best level this CPU supports."""
    forced = os.environ.get("FBJAX_FFI_ISA")
    if forced:
        if forced not in supported_isas():
            raise BuildError(f"FBJAX_FFI_ISA={forced!r} is not supported on this CPU; "
                             f"supported: {supported_isas()}")
        return forced
    return supported_isas()[-1]


def target_name(isa: str) -> str:
    return f"fbjax_ragged_paged_attention_cpu_{isa}"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(f"C++ compiler {cxx!r} not found (set $CXX); needed to build "
                         f"{SOURCE.name}")
    return path


def cache_dir() -> Path:
    if os.environ.get("FBJAX_FFI_CACHE"):
        return Path(os.environ["FBJAX_FFI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "fbjax" / "ffi"


def _library_path(cxx: str, flags: tuple[str, ...], source: Path) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (source.read_bytes(), jax.__version__.encode(), cxx.encode(),
                 version.encode(), " ".join(flags).encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{source.stem}_{key.hexdigest()[:20]}.so"


def build(isa: str, source: Path = SOURCE) -> Path:
    """The compiled library of ``source`` for ``isa``; compiled if not cached.

    Any failure (no compiler, compile error, unwritable cache directory) is a
    :class:`BuildError` that says what to do."""
    try:
        return _build(isa, source)
    except OSError as e:
        raise BuildError(f"cannot build {source.name} into {cache_dir()} ({e}); set "
                         f"$FBJAX_FFI_CACHE to a writable directory or $CXX to a working "
                         f"C++ compiler") from e


def _build(isa: str, source: Path) -> Path:
    cxx = _compiler()
    flags = BASE_FLAGS + ISAS[isa][0]
    lib = _library_path(cxx, flags, source)
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
        os.close(fd)
        cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"building {source.name} failed ({' '.join(cmd)}):\n"
                                 f"{proc.stderr.strip()}")
            os.replace(tmp, lib)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return lib


@functools.cache
def _load(isa: str) -> str:
    lib = build(isa)
    try:
        handle = ctypes.cdll.LoadLibrary(str(lib))
    except OSError as e:
        raise BuildError(f"loading {lib} failed: {e}") from e
    name = target_name(isa)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handle.FbjaxRaggedPagedAttention),
                                platform="cpu")
    return name


def load(isa: str | None = None) -> str:
    """Build (if needed), load and register the kernel for ``isa`` (default:
    :func:`default_isa`); returns the FFI target name.

    Raises :class:`BuildError` with the compiler's output if it cannot be built."""
    return _load(isa or default_isa())


def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_block_tokens: int | None = None,
    q_block: int | None = None,
    isa: str | None = None,
) -> jax.Array:
    """Attention of a ragged batch over a paged cache; returns [tokens, q_heads, head_dim].

    Padding tokens (past ``cu_q_lens[num_seqs]``) get zeros. ``kv_block_tokens`` and
    ``q_block`` are tiling knobs of the jnp implementations, accepted and ignored here;
    ``isa`` picks a build (default :func:`default_isa`). float32 and bfloat16 run in
    C++; float16 has no C++ path and runs the ``xla`` implementation instead.
    """
    del kv_block_tokens, q_block
    check_attention_args(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    head_dim = q.shape[-1]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    if jnp.float16 in (q.dtype, k_cache.dtype, v_cache.dtype):
        from fbjax_kernels.ragged_paged_attention.xla import ragged_paged_attention as xla_attn

        return xla_attn(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
                        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    name = load(isa)
    i32 = jnp.int32
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(q.shape, q.dtype),
                            vmap_method="sequential")
    return call(q, k_cache, v_cache.astype(k_cache.dtype), jnp.asarray(kv_lens, i32),
                jnp.asarray(page_indices, i32), jnp.asarray(cu_q_lens, i32),
                jnp.asarray(num_seqs, i32).reshape(()),
                sm_scale=np.float32(sm_scale),
                sliding_window=np.int64(-1 if sliding_window is None else sliding_window),
                soft_cap=np.float32(soft_cap or 0.0))
