"""``xla``-only shapes: where the CPU-oriented jax.numpy implementation takes its own
paths (buckets of several self tiles, decode and chunk groups that loop). Everything
else is in ``test_conformance.py``.
"""

from __future__ import annotations

import fbjax_kernels.ragged_paged_attention.xla as xla_module
import numpy as np
import pytest

from .conformance import BY_NAME, check, make_batch, reference, run

XLA = BY_NAME["xla"]


@pytest.mark.parametrize("window", [None, 90])
def test_many_self_tiles(window):
    """Buckets of several self tiles: prompts crossing tile edges, a chunk with a long
    prefix, decodes, an idle sequence, and padding, in a bucket that is not a whole
    number of tiles."""
    specs = [(1, 400), (150, 150), (3, 3), (0, 50), (97, 700), (1, 1), (60, 60), (1, 65)]
    batch = make_batch(specs, head_dim=32, spare_pages=3, extra_seqs=2,
                       extra_tokens=2 * xla_module.SELF_TILE + 5)
    check(XLA, batch, sliding_window=window)


def test_decode_groups_and_chunk_groups_loop():
    """More decodes than one decode group and more chunk blocks than one chunk group."""
    specs = [(1, 10 + 37 * i) for i in range(xla_module.DECODE_GROUP + 5)]
    specs += [(40, 300), (23, 90), (70, 71)]
    check(XLA, make_batch(specs, seed=4, head_dim=32, spare_pages=3))


def test_matches_reference_on_an_engine_like_batch():
    specs = [(1, 200 + 13 * i) for i in range(24)] + [(120, 120), (90, 187)]
    batch = make_batch(specs, head_dim=32, spare_pages=3, extra_seqs=32 - len(specs),
                       extra_tokens=256 - sum(q for q, _ in specs), pages_per_seq=128)
    np.testing.assert_allclose(run(XLA, batch), reference(batch), rtol=1e-5, atol=1e-5)
