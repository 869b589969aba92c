"""Ragged paged attention: one signature, one implementation per backend.

``reference`` (jax.numpy) is the ground truth. ``xla`` (jax.numpy too) computes the
same thing organised for XLA on CPU, and is the CPU path. Pallas kernels for GPU and
TPU plug in here under the same signature (see ``IMPLEMENTATIONS``). ``auto`` picks
``xla`` on CPU and ``reference`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

from kernels.ragged_paged_attention.gpu import (
    ragged_paged_attention as pallas_gpu_attention,
)
from kernels.ragged_paged_attention.reference import (
    ragged_paged_attention as reference_attention,
)
from kernels.ragged_paged_attention.reference import write_kv
from kernels.ragged_paged_attention.tpu import (
    ragged_paged_attention as pallas_tpu_attention,
)
from kernels.ragged_paged_attention.xla import ragged_paged_attention as xla_attention

IMPLEMENTATIONS: dict[str, Callable] = {"reference": reference_attention}
IMPLEMENTATIONS["xla"] = xla_attention
IMPLEMENTATIONS["pallas_gpu"] = pallas_gpu_attention
IMPLEMENTATIONS["pallas_tpu"] = pallas_tpu_attention


def resolve_impl(impl: str) -> str:
    """``auto`` -> the default for the current JAX backend; other names unchanged."""
    if impl == "auto":
        import jax

        return "xla" if jax.default_backend() == "cpu" else "reference"
    return impl


def get_attention(impl: str) -> Callable:
    """The attention function named ``impl`` (or ``auto``); a clear error for an unknown
    name."""
    impl = resolve_impl(impl)
    try:
        return IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention_impl {impl!r}; choose one of "
            f"{sorted(IMPLEMENTATIONS) + ['auto']}"
        ) from None


__all__ = ["get_attention", "reference_attention", "resolve_impl", "write_kv",
           "xla_attention", "IMPLEMENTATIONS"]
