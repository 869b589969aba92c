"""Timing the implementations side by side on one batch shape.

The figures of ``scripts/bench_kernels.py`` and of ``scripts/device_check.py`` (stage
3) come from here: per shape and implementation, the time of one jitted call, the KV
bytes it must read at least (decode is bound by them: GB/s against the device's HBM
peak) and the attention FLOPs (prefill is bound by them), and the speed-up over the
jax.numpy reference compiled by XLA. A Pallas kernel off its own platform runs in
the interpreter: one timed call, and a figure of the interpreter, not of the kernel.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fbjax_kernels.ragged_paged_attention import IMPLEMENTATIONS, PALLAS_FOR_PLATFORM


@dataclasses.dataclass(frozen=True)
class Shape:
    """A ragged batch: one (query tokens, context) pair per sequence."""

    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.q_lens)


def shapes(small: bool) -> list[Shape]:
    """Decode, prefill and mixed batches: Llama-3-8B heads on an accelerator, a
    smaller model's (``small``) where the kernels run in an interpreter."""
    if small:
        return [Shape("decode 32 x 512", (1,) * 32, (512,) * 32, 8, 2, 64),
                Shape("prefill 2 x 256 (prefix 256)", (256, 256), (512, 512), 8, 2, 64),
                Shape("mixed 1 x 128 + 16 decodes", (128,) + (1,) * 16, (640,) + (512,) * 16,
                      8, 2, 64)]
    return [Shape("decode 64 x 2048", (1,) * 64, (2048,) * 64),
            Shape("decode 256 x 1024", (1,) * 256, (1024,) * 256),
            Shape("prefill 4 x 1024 (prefix 1024)", (1024,) * 4, (2048,) * 4),
            Shape("mixed 1 x 1024 + 64 decodes", (1024,) + (1,) * 64, (3072,) + (2048,) * 64)]


def make_inputs(shape: Shape, dtype, rng: np.random.Generator) -> tuple:
    """The seven arguments of ``ragged_paged_attention`` for ``shape``, pages shuffled."""
    num_seqs = len(shape.q_lens)
    pages_per_seq = -(-max(shape.kv_lens) // shape.page_size)
    num_pages = num_seqs * pages_per_seq + 1
    tokens = sum(shape.q_lens)
    q = jnp.asarray(rng.standard_normal((tokens, shape.q_heads, shape.head_dim)), dtype)
    cache_shape = (num_pages, shape.page_size, shape.kv_heads, shape.head_dim)
    k = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    v = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    pages = rng.permutation(num_pages)[:num_seqs * pages_per_seq].reshape(num_seqs, -1)
    cu = np.concatenate([[0], np.cumsum(shape.q_lens)]).astype(np.int32)
    return (q, k, v, jnp.asarray(shape.kv_lens, jnp.int32), jnp.asarray(pages, jnp.int32),
            jnp.asarray(cu), jnp.asarray(num_seqs, jnp.int32))


def work(shape: Shape, itemsize: int) -> tuple[float, float]:
    """(KV bytes read, attention FLOPs) the batch needs at minimum."""
    kv_bytes = sum(2 * kv * shape.kv_heads * shape.head_dim * itemsize for kv in shape.kv_lens)
    flops = 0.0
    for q, kv in zip(shape.q_lens, shape.kv_lens, strict=True):
        visible = sum(kv - q + i + 1 for i in range(q))  # causal keys per query token
        flops += 4 * visible * shape.q_heads * shape.head_dim
    return kv_bytes, flops


def time_call(fn: Callable, args: tuple, repeats: int) -> float:
    """Seconds per call, after one untimed call (compilation, first transfers)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def interpreted(impl: str, backend: str) -> bool:
    """Whether ``impl`` runs in a Pallas interpreter on ``backend`` (not compiled)."""
    return impl in PALLAS_FOR_PLATFORM.values() and PALLAS_FOR_PLATFORM.get(backend) != impl


@dataclasses.dataclass(frozen=True)
class Timing:
    """One implementation on one shape (``error`` set and times NaN when it failed)."""

    shape: str
    impl: str
    seconds: float
    kv_bytes: float
    flops: float
    decode: bool
    interpreted: bool = False
    vs_reference: float | None = None  # reference time / this time
    error: str | None = None

    @property
    def kv_gbs(self) -> float:
        return self.kv_bytes / self.seconds / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    def peak_share(self, hbm_peak_tbs: float | None) -> float | None:
        """KV GB/s as a share of the HBM peak: for decode shapes, which are bound by it."""
        if not hbm_peak_tbs or not self.decode or math.isnan(self.seconds):
            return None
        return self.kv_gbs / (hbm_peak_tbs * 1e3)


def bench_shape(shape: Shape, impls: Sequence[str], dtype, repeats: int,
                rng: np.random.Generator) -> Iterator[Timing]:
    """Time ``impls`` (names in ``IMPLEMENTATIONS``) on one batch of ``shape``, the reference
    first whatever the order, each yielded as soon as it is measured; a failing
    implementation yields its error and the others go on."""
    args = make_inputs(shape, dtype, rng)
    kv_bytes, flops = work(shape, jnp.dtype(dtype).itemsize)
    backend = jax.default_backend()
    base = None
    for name in sorted(impls, key=lambda n: n != "reference"):
        slow = interpreted(name, backend)
        try:
            seconds = time_call(jax.jit(IMPLEMENTATIONS[name]), args, 1 if slow else repeats)
        except Exception as e:  # noqa: BLE001 - one kernel's failure is a row, not the end
            yield Timing(shape.name, name, math.nan, kv_bytes, flops, shape.is_decode, slow,
                         error=f"{type(e).__name__}: {e}")
            continue
        if name == "reference":
            base = seconds
        yield Timing(shape.name, name, seconds, kv_bytes, flops, shape.is_decode, slow,
                     base / seconds if base else None)
