"""Ragged paged attention: Pallas kernels vs the jax.numpy reference compiled by XLA.

For decode-heavy batches it prints achieved KV bytes read per second and their share of
the device's HBM peak (``--hbm_peak_tbs``, default from ``fbjax.profiling.device``'s
table of known cards); for prefill-heavy and mixed batches, attention TFLOP/s.
Each shape runs every implementation in the same process, side by side, and prints the
ratio to the reference (the timing itself is ``fbjax_kernels.ragged_paged_attention.
bench``, which ``scripts/device_check.py`` uses too). On a machine without a GPU/TPU
the Pallas kernels run in the interpreter: their figures then measure the interpreter,
not the kernel (a note says so).

    python scripts/bench_kernels.py                    # all implementations, default shapes
    python scripts/bench_kernels.py --impls reference,pallas_gpu --hbm_peak_tbs 3.35
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax_kernels.ragged_paged_attention import IMPLEMENTATIONS  # noqa: E402
from fbjax_kernels.ragged_paged_attention.bench import Timing, bench_shape, shapes  # noqa: E402

from fbjax.profiling.device import hbm_peak_tbs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("impls", None, "Implementations to time (default: all registered).")
flags.DEFINE_string("dtype", "bfloat16", "float32 or bfloat16.")
flags.DEFINE_integer("repeats", 20, "Timed calls per shape (after one warm-up).")
flags.DEFINE_float("hbm_peak_tbs", None, "Device HBM peak in TB/s, to print decode "
                   "efficiency (default: the known peak of this device, if any).")
flags.DEFINE_bool("small", None, "Use small shapes (default: small when no accelerator).")


def row(t: Timing, peak: float | None) -> str:
    """One markdown table row (an error row when the implementation failed)."""
    if t.error:
        return f"| {t.shape} | {t.impl} | error: {t.error.splitlines()[0][:120]} | | | |"
    share = t.peak_share(peak)
    extra = f" ({share:.0%} of peak)" if share is not None else ""
    ratio = f"{t.vs_reference:.2f}x" if t.vs_reference else ""
    return (f"| {t.shape} | {t.impl} | {t.seconds * 1e3:.3f} | {t.kv_gbs:.1f}{extra} "
            f"| {t.tflops:.3f} | {ratio} |")


def main(argv):
    del argv
    backend = jax.default_backend()
    device = jax.devices()[0]
    small = FLAGS.small if FLAGS.small is not None else backend == "cpu"
    impls = FLAGS.impls or sorted(IMPLEMENTATIONS)
    dtype = jnp.dtype(FLAGS.dtype)
    peak = FLAGS.hbm_peak_tbs or hbm_peak_tbs(device.device_kind)
    print(f"backend {backend} ({device.device_kind}), dtype {dtype.name}, "
          f"{'small' if small else 'full'} shapes, HBM peak "
          f"{f'{peak} TB/s' if peak else 'unknown'}")
    if backend == "cpu":
        print("note: no accelerator: Pallas kernels run in the interpreter; their times "
              "measure the interpreter, not the kernel.")
    rng = np.random.default_rng(0)
    print("\n| shape | impl | ms | KV GB/s | TFLOP/s | vs reference |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in shapes(small):
        for timing in bench_shape(shape, impls, dtype, FLAGS.repeats, rng):
            print(row(timing, peak), flush=True)


if __name__ == "__main__":
    app.run(main)
