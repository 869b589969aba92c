"""Ragged paged attention: Pallas kernels vs the jax.numpy reference compiled by XLA.

For decode-heavy batches it prints achieved KV bytes read per second (and the share of
``--hbm_peak_tbs`` when given); for prefill-heavy and mixed batches, attention TFLOP/s.
Each shape runs every implementation in the same process, side by side, and prints the
ratio to the reference. On a machine without a GPU/TPU the Pallas kernels run in the
interpreter: their figures then measure the interpreter, not the kernel (a note says so).

    python scripts/bench_kernels.py                    # all implementations, default shapes
    python scripts/bench_kernels.py --impls reference,pallas_gpu --hbm_peak_tbs 3.35
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax_kernels.ragged_paged_attention import IMPLEMENTATIONS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("impls", None, "Implementations to time (default: all registered).")
flags.DEFINE_string("dtype", "bfloat16", "float32 or bfloat16.")
flags.DEFINE_integer("repeats", 20, "Timed calls per shape (after one warm-up).")
flags.DEFINE_float("hbm_peak_tbs", None, "Device HBM peak in TB/s, to print decode efficiency.")
flags.DEFINE_bool("small", None, "Use small shapes (default: small when no accelerator).")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16


def shapes(small: bool) -> list[Shape]:
    if small:
        return [Shape("decode 32 x 512", (1,) * 32, (512,) * 32, 8, 2, 64),
                Shape("prefill 2 x 256 (prefix 256)", (256, 256), (512, 512), 8, 2, 64),
                Shape("mixed 1 x 128 + 16 decodes", (128,) + (1,) * 16, (640,) + (512,) * 16,
                      8, 2, 64)]
    return [Shape("decode 64 x 2048", (1,) * 64, (2048,) * 64),
            Shape("decode 256 x 1024", (1,) * 256, (1024,) * 256),
            Shape("prefill 4 x 1024 (prefix 1024)", (1024,) * 4, (2048,) * 4),
            Shape("mixed 1 x 1024 + 64 decodes", (1024,) + (1,) * 64, (3072,) + (2048,) * 64)]


def make_inputs(shape: Shape, dtype, rng: np.random.Generator):
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


def time_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main(argv):
    del argv
    backend = jax.default_backend()
    small = FLAGS.small if FLAGS.small is not None else backend == "cpu"
    impls = FLAGS.impls or sorted(IMPLEMENTATIONS)
    dtype = jnp.dtype(FLAGS.dtype)
    print(f"backend {backend} ({jax.devices()[0].device_kind}), dtype {dtype.name}, "
          f"{'small' if small else 'full'} shapes")
    if backend == "cpu":
        print("note: no accelerator: Pallas kernels run in the interpreter; their times "
              "measure the interpreter, not the kernel.")
    rng = np.random.default_rng(0)
    print("\n| shape | impl | ms | KV GB/s | TFLOP/s | vs reference |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in shapes(small):
        args = make_inputs(shape, dtype, rng)
        kv_bytes, flops = work(shape, dtype.itemsize)
        base = None
        for name in ["reference"] + [i for i in impls if i != "reference"]:
            if name not in impls:
                continue
            fn = jax.jit(IMPLEMENTATIONS[name])
            seconds = time_call(fn, args, 1 if "pallas" in name and backend == "cpu"
                                else FLAGS.repeats)
            base = base or seconds
            gbs = kv_bytes / seconds / 1e9
            extra = (f" ({gbs / (FLAGS.hbm_peak_tbs * 1e3):.0%} of peak)"
                     if FLAGS.hbm_peak_tbs and shape.name.startswith("decode") else "")
            print(f"| {shape.name} | {name} | {seconds * 1e3:.3f} | {gbs:.1f}{extra} "
                  f"| {flops / seconds / 1e12:.3f} | {base / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    app.run(main)
