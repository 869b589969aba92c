"""Pallas Mosaic TPU kernel only: the interpreter's race detector on its double buffer.

On a CPU host the kernel runs in the Mosaic TPU interpreter (it simulates HBM, VMEM,
DMAs and semaphores, and fills fresh buffers with NaNs), where ``test_conformance.py``
checks its results.
"""

from __future__ import annotations

import pytest
from jax.experimental.pallas import tpu as pltpu

from .conformance import BY_NAME, check, make_batch

TPU = BY_NAME["pallas_tpu"]


def test_no_races_in_double_buffering():
    """The interpreter's race detector sees no DMA overwriting a slot still being read."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interp
    except ImportError:  # private module; moved in another jax version
        pytest.skip("no TPU interpreter race detector in this jax")
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    check(TPU, make_batch("mixed", extra_tokens=2), "float32", kv_block_tokens=32,
          interpret=params)
    races = getattr(interp, "races", None)
    if races is None:
        pytest.skip("race detector state not exposed")
    assert not races.races_found
