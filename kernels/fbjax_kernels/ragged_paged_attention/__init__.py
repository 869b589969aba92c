"""Ragged paged attention: one signature, one implementation per backend.

``reference`` (jax.numpy) is the ground truth. ``xla`` (jax.numpy too) computes the
same thing organised for XLA on CPU. ``cpu_ffi`` is a C++ kernel called through the
XLA FFI that reads the paged cache in place, and is the CPU path. Pallas kernels for
GPU (Triton) and TPU (Mosaic) plug in here under the same signature (see
``IMPLEMENTATIONS``). ``auto`` picks the platform's own kernel: ``cpu_ffi`` on CPU
(``xla``, with a warning saying why, if the C++ kernel cannot be built here),
``pallas_gpu`` on GPU, ``pallas_tpu`` on TPU, ``reference`` on any other platform
(``resolve_attention_impl``). What vouches for the Pallas choice is stage 2 of
``scripts/device_check.py``: the conformance suite compiled for the device, not
interpreted (docs/devices.md). ``reference`` stays selectable by name everywhere.
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


# ``auto`` on an accelerator: its Pallas kernel (JAX platform name -> implementation).
PALLAS_FOR_PLATFORM = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def resolve_attention_impl(platform: str, requested: str = "auto", *,
                           cpu_ffi_available: Callable[[], bool] = _cpu_ffi_for_auto) -> str:
    """What ``requested`` means on JAX platform ``platform`` (``jax.default_backend()``):
    a name is itself; ``auto`` is the platform's kernel (see the module docstring).
    ``cpu_ffi_available`` is asked only for ``auto`` on CPU (it may build the kernel)."""
    if requested != "auto":
        return requested
    if platform == "cpu":
        return "cpu_ffi" if cpu_ffi_available() else "xla"
    return PALLAS_FOR_PLATFORM.get(platform, "reference")


def resolve_impl(impl: str) -> str:
    """``auto`` -> the default for the current JAX backend; other names unchanged."""
    if impl == "auto":
        import jax

        return resolve_attention_impl(jax.default_backend(), impl)
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


__all__ = ["cpu_ffi", "get_attention", "reference_attention", "resolve_attention_impl",
           "resolve_impl", "write_kv", "xla_attention", "IMPLEMENTATIONS", "PALLAS_FOR_PLATFORM"]
