"""Pallas GPU (Triton) kernel only: the interpreter flag, and a lowering check.

On a machine without a GPU the kernel runs in the generic Pallas interpreter
(``interpret`` defaults to True off GPU), where ``test_conformance.py`` checks its
results; here one test lowers it for CUDA (to Triton IR; no GPU needed) to check that
it is a valid Triton kernel.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention.gpu import ragged_paged_attention as gpu_attention

from .conformance import BY_NAME, make_batch, run

GPU = BY_NAME["pallas_gpu"]


def test_interprets_off_gpu():
    batch = make_batch("decode")
    # eager call, explicit interpret flag: same answer as the jitted default
    out = gpu_attention(*batch.args, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), run(GPU, batch))


@pytest.mark.parametrize(
    ("dtype", "head_dim", "ratio", "kw"),
    [("float32", 64, 4, {}),
     ("bfloat16", 80, 7, {"sliding_window": 9, "soft_cap": 5.0, "num_warps": 8})],
    ids=["f32", "bf16_window_cap_unpadded"],
)
def test_lowers_to_triton(dtype, head_dim, ratio, kw):
    # Lowering for CUDA needs no GPU: it checks that every op in the kernel has a Triton
    # lowering and the tiles have legal (power of two) shapes.
    batch = make_batch([(3, 40), (1, 17)], ratio=ratio, head_dim=head_dim, dtype=dtype,
                       spare_pages=3, extra_seqs=1, extra_tokens=2)
    fn = jax.jit(functools.partial(gpu_attention, interpret=False, **kw))
    text = fn.trace(*batch.args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    assert f"num_warps = {kw.get('num_warps', 4)} : i32" in text
