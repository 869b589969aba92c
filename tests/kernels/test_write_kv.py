"""The companion cache update ``write_kv`` (shared by every attention implementation).

Attention itself is checked for every implementation in ``test_conformance.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import write_kv

from .conformance import DTYPES, jit_write_kv, make_batch


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_write_kv(cache_dtype):
    rng = np.random.default_rng(7)
    num_pages, page_size, kv_heads, head_dim = 6, 16, 2, 64
    num_slots = num_pages * page_size
    dtype = DTYPES[cache_dtype]
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = rng.standard_normal(shape, np.float32).astype(dtype)
    v_cache = rng.standard_normal(shape, np.float32).astype(dtype)
    live = rng.choice(num_slots, size=20, replace=False)
    pad = np.array([num_slots, num_slots, num_slots + 1, 10 * num_slots])
    slots = np.concatenate([live[:11], pad[:2], live[11:], pad[2:]]).astype(np.int32)
    new_k = rng.standard_normal((len(slots), kv_heads, head_dim), np.float32)
    new_v = rng.standard_normal((len(slots), kv_heads, head_dim), np.float32)

    k_out, v_out = jit_write_kv(k_cache, v_cache, new_k, new_v, slots)
    assert k_out.shape == shape and k_out.dtype == dtype and v_out.dtype == dtype

    for cache, new, out in ((k_cache, new_k, k_out), (v_cache, new_v, v_out)):
        flat_in = cache.reshape(num_slots, kv_heads, head_dim)
        flat_out = np.asarray(out).reshape(num_slots, kv_heads, head_dim)
        written = slots < num_slots
        # written slots hold the new values (cast to the cache dtype)
        np.testing.assert_array_equal(flat_out[slots[written]], new[written].astype(dtype))
        # every other slot, including what padding tokens would have hit, is unchanged
        untouched = np.ones(num_slots, bool)
        untouched[slots[written]] = False
        np.testing.assert_array_equal(flat_out[untouched], flat_in[untouched])


def test_write_kv_only_padding_leaves_cache_unchanged():
    rng = np.random.default_rng(8)
    shape = (3, 16, 1, 64)
    k_cache = rng.standard_normal(shape, np.float32)
    v_cache = rng.standard_normal(shape, np.float32)
    slots = np.full(5, 3 * 16, np.int32)
    new = np.ones((5, 1, 64), np.float32)
    k_out, v_out = write_kv(jnp.asarray(k_cache), jnp.asarray(v_cache), new, new, slots)
    np.testing.assert_array_equal(np.asarray(k_out), k_cache)
    np.testing.assert_array_equal(np.asarray(v_out), v_cache)


def test_batch_slot_mapping_addresses_the_sequence_pages():
    # make_batch's slot_mapping points each token at its own position's page slot
    batch = make_batch("mixed", extra_tokens=4)
    new = np.zeros((batch.q.shape[0], 2, 64), np.float32)
    k_out, _ = jit_write_kv(batch.k_cache, batch.v_cache, new, new, batch.slot_mapping)
    k_out = np.asarray(k_out)
    page_size = batch.k_cache.shape[1]
    for s in range(int(batch.num_seqs)):
        q_len, kv_len = int(batch.q_lens[s]), int(batch.kv_lens[s])
        for pos in range(kv_len):
            page = batch.page_indices[s, pos // page_size]
            is_new = pos >= kv_len - q_len
            assert np.all(k_out[page, pos % page_size] == 0.0) == is_new


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("new_k", lambda a: {**a, "new_k": a["new_k"][:, :, :32]}),
        ("new_v", lambda a: {**a, "new_v": a["new_v"][:-1]}),
        ("v_cache", lambda a: {**a, "v_cache": a["v_cache"][:-1]}),
        ("slot_mapping", lambda a: {**a, "slot_mapping": a["slot_mapping"].astype(np.float32)}),
    ],
)
def test_write_kv_bad_arguments(name, corrupt):
    cache = np.zeros((4, 16, 2, 64), np.float32)
    args = {
        "k_cache": cache,
        "v_cache": cache,
        "new_k": np.zeros((5, 2, 64), np.float32),
        "new_v": np.zeros((5, 2, 64), np.float32),
        "slot_mapping": np.arange(5, dtype=np.int32),
    }
    with pytest.raises(ValueError, match=f"'{name}'"):
        write_kv(**corrupt(args))
