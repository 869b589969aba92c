"""Argument checks shared by every attention implementation.

Shapes are static under tracing, so these run before (or during) tracing and turn a
shape or dtype mistake into an error that names the argument, instead of an XLA
shape error deep inside the lowered program.
"""

from __future__ import annotations

import jax.numpy as jnp

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"ragged_paged_attention: argument '{name}' {msg}")


def _check_int(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        _fail(name, f"must be an integer array, got dtype {x.dtype}")


def check_attention_args(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs):
    if q.ndim != 3:
        _fail("q", f"must be [tokens, q_heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        _fail("k_cache", f"must be [pages, page_size, kv_heads, head_dim], got {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        _fail("v_cache", f"shape {v_cache.shape} differs from k_cache {k_cache.shape}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype not in _FLOAT_DTYPES:
            _fail(name, f"must be float32, bfloat16 or float16, got {x.dtype}")
    _, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        _fail("k_cache", f"head_dim {k_cache.shape[3]} differs from q's {head_dim}")
    if q_heads % kv_heads:
        _fail("q", f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    if kv_lens.ndim != 1:
        _fail("kv_lens", f"must be [max_seqs], got shape {kv_lens.shape}")
    if page_indices.ndim != 2 or page_indices.shape[0] != kv_lens.shape[0]:
        _fail("page_indices", f"must be [max_seqs={kv_lens.shape[0]}, pages_per_seq], "
              f"got {page_indices.shape}")
    if cu_q_lens.shape != (kv_lens.shape[0] + 1,):
        _fail("cu_q_lens", f"must be [max_seqs + 1 = {kv_lens.shape[0] + 1}], "
              f"got {cu_q_lens.shape}")
    for name, x in (("kv_lens", kv_lens), ("page_indices", page_indices),
                    ("cu_q_lens", cu_q_lens)):
        _check_int(name, x)
    if jnp.size(num_seqs) != 1:
        _fail("num_seqs", f"must hold one value, got shape {jnp.shape(num_seqs)}")


def check_write_args(k_cache, v_cache, new_k, new_v, slot_mapping):
    if v_cache.shape != k_cache.shape:
        _fail("v_cache", f"shape {v_cache.shape} differs from k_cache {k_cache.shape}")
    want = (slot_mapping.shape[0], k_cache.shape[2], k_cache.shape[3])
    for name, x in (("new_k", new_k), ("new_v", new_v)):
        if x.shape != want:
            _fail(name, f"must be [tokens, kv_heads, head_dim] = {want}, got {x.shape}")
    if slot_mapping.ndim != 1:
        _fail("slot_mapping", f"must be [tokens], got shape {slot_mapping.shape}")
    _check_int("slot_mapping", slot_mapping)
