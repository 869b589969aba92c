"""Ragged paged attention: one signature, one implementation per backend.

``reference`` (jax.numpy) is the ground truth. ``xla`` (jax.numpy too) computes the
same thing organised for XLA on CPU. ``cpu_ffi`` is a C++ kernel called through the
XLA FFI that reads the paged cache in place, and is the CPU path. Pallas kernels for
GPU and TPU plug in here under the same signature (see ``IMPLEMENTATIONS``). ``auto``
picks ``cpu_ffi`` on CPU (``xla``, with a warning saying why, if the C++ kernel cannot
be built here) and ``reference`` elsewhere.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from fbjax_kernels.ragged_paged_attention import cpu_ffi
from fbjax_kernels.ragged_paged_attention.gpu import (
    ragged_paged_attention as pallas_gpu_attention,
)
from fbjax_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention as reference_attention,
)
from fbjax_kernels.ragged_paged_attention.reference import write_kv
from fbjax_kernels.ragged_paged_attention.tpu import (
    ragged_paged_attention as pallas_tpu_attention,
)
from fbjax_kernels.ragged_paged_attention.xla import ragged_paged_attention as xla_attention

IMPLEMENTATIONS: dict[str, Callable] = {"reference": reference_attention}
IMPLEMENTATIONS["xla"] = xla_attention
IMPLEMENTATIONS["cpu_ffi"] = cpu_ffi.ragged_paged_attention
IMPLEMENTATIONS["pallas_gpu"] = pallas_gpu_attention
IMPLEMENTATIONS["pallas_tpu"] = pallas_tpu_attention


log = logging.getLogger(__name__)


@functools.cache
def _cpu_ffi_for_auto() -> bool:
    """Whether ``auto`` can use ``cpu_ffi`` (built and registered); warns once if not."""
    try:
        cpu_ffi.load()
    except cpu_ffi.BuildError as e:
        log.warning("attention_impl auto: the cpu_ffi kernel is unavailable, using xla "
                    "(slower decode attention). Reason: %s", e)
        return False
    return True


def resolve_impl(impl: str) -> str:
    """``auto`` -> the default for the current JAX backend; other names unchanged."""
    if impl == "auto":
        import jax

        if jax.default_backend() != "cpu":
            return "reference"
        return "cpu_ffi" if _cpu_ffi_for_auto() else "xla"
    return impl


def get_attention(impl: str) -> Callable:
    """The attention function named ``impl`` (or ``auto``); a clear error for an unknown
    name. ``cpu_ffi`` is built and registered here, before anything that calls it is
    compiled or loaded from the persistent compilation cache (a build failure raises
    :class:`cpu_ffi.BuildError` when asked for by name)."""
    impl = resolve_impl(impl)
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention_impl {impl!r}; choose one of "
            f"{sorted(IMPLEMENTATIONS) + ['auto']}"
        ) from None
    if impl == "cpu_ffi":
        cpu_ffi.load()
    return fn


__all__ = ["cpu_ffi", "get_attention", "reference_attention", "resolve_impl", "write_kv",
           "xla_attention", "IMPLEMENTATIONS"]
