"""Ragged paged attention: one signature, one implementation per backend.

``reference`` (jax.numpy) is the ground truth and the CPU path. Pallas kernels for GPU
and TPU plug in here under the same signature (see ``IMPLEMENTATIONS``).
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

IMPLEMENTATIONS: dict[str, Callable] = {"reference": reference_attention}
IMPLEMENTATIONS["pallas_gpu"] = pallas_gpu_attention
IMPLEMENTATIONS["pallas_tpu"] = pallas_tpu_attention


def get_attention(impl: str) -> Callable:
    """The attention function named ``impl``; a clear error for an unknown name."""
    try:
        return IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention_impl {impl!r}; choose one of {sorted(IMPLEMENTATIONS)}"
        ) from None


__all__ = ["get_attention", "reference_attention", "write_kv", "IMPLEMENTATIONS"]
