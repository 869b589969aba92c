"""Ragged paged attention in plain jax.numpy: the ground truth every kernel is tested against.

A *ragged* batch packs the query tokens of many sequences on one flat axis: sequence
``s`` owns tokens ``cu_q_lens[s]:cu_q_lens[s+1]``. Its keys and values live in a paged
cache (``[num_pages, page_size, kv_heads, head_dim]``) at the pages listed in row ``s`` of
``page_indices``; ``kv_lens[s]`` counts its context *including* this step's tokens, which
are already written to the cache (see :func:`write_kv`). A query token at absolute
position ``p`` sees keys ``0..p`` of its own sequence (causal), so a prompt chunk sees the
cached prefix plus itself and a decode token sees everything before it.

Work is tiled as the Pallas kernels tile it. Queries are cut into *query blocks* of
``q_block`` consecutive tokens of one sequence (default ``tokens // max_seqs``, so a
decode-only bucket gets one token per block and a prefill bucket long blocks that
share one gather of their sequence's keys). The context is walked in blocks of whole
pages with an online softmax; the trip count is the longest context in the batch, not
the page table's width, so a decode step over short sequences does not pay for the
model's maximum context. Key blocks sit at absolute positions, so a sequence's
result is the same whether its prompt was prefilled at once or in chunks, alone or
beside others (batch invariance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbjax_kernels.ragged_paged_attention.validation import check_attention_args, check_write_args

# Keys per loop iteration: large enough that the loop overhead is small on CPU, small
# enough that the per-token gather [tokens, block, kv_heads, head_dim] stays modest.
DEFAULT_KV_BLOCK_TOKENS = 128


def write_kv(
    k_cache: jax.Array,
    v_cache: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V ([tokens, kv_heads, head_dim]) into the paged cache.

    ``slot_mapping[t] = page * page_size + offset``; padding tokens carry a slot past the
    end of the pool and are dropped, so padded buckets never touch live pages.
    """
    check_write_args(k_cache, v_cache, new_k, new_v, slot_mapping)
    num_pages, page_size, kv_heads, head_dim = k_cache.shape
    flat_shape = (num_pages * page_size, kv_heads, head_dim)
    # A negative slot (vLLM's padding convention) would wrap around; drop it too.
    slot_mapping = jnp.where(slot_mapping < 0, flat_shape[0], slot_mapping)
    k_flat = k_cache.reshape(flat_shape).at[slot_mapping].set(
        new_k.astype(k_cache.dtype), mode="drop"
    )
    v_flat = v_cache.reshape(flat_shape).at[slot_mapping].set(
        new_v.astype(v_cache.dtype), mode="drop"
    )
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_block_tokens: int = DEFAULT_KV_BLOCK_TOKENS,
    q_block: int | None = None,
) -> jax.Array:
    """Attention of a ragged batch over a paged cache; returns [tokens, q_heads, head_dim].

    Padding tokens (past ``cu_q_lens[num_seqs]``) get zeros.
    """
    check_attention_args(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    max_seqs, pages_per_seq = page_indices.shape
    group = q_heads // kv_heads
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    if q_block is None:
        q_block = max(1, num_tokens // max_seqs)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())

    block_pages = max(1, min(pages_per_seq, kv_block_tokens // page_size))
    num_kv_blocks_max = -(-pages_per_seq // block_pages)
    page_table = jnp.pad(
        page_indices, ((0, 0), (0, num_kv_blocks_max * block_pages - pages_per_seq)))
    block_tokens = block_pages * page_size

    # Query blocks: block b holds tokens rows[b] of sequence b_seq[b]. Every block has at
    # least one token, and each sequence adds at most one partial block.
    live = jnp.arange(max_seqs) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks_per_seq = (q_lens + q_block - 1) // q_block
    first_block = jnp.cumsum(blocks_per_seq) - blocks_per_seq
    num_q_blocks = min(num_tokens, -(-num_tokens // q_block) + max_seqs)
    b = jnp.arange(num_q_blocks, dtype=jnp.int32)
    b_seq = jnp.searchsorted(first_block + blocks_per_seq, b, side="right").astype(jnp.int32)
    b_seq = jnp.minimum(b_seq, max_seqs - 1)
    b_live = b < jnp.sum(blocks_per_seq)
    rows = (cu_q_lens[b_seq] + (b - first_block[b_seq]) * q_block)[:, None] + jnp.arange(
        q_block, dtype=jnp.int32)[None, :]  # [NB, Bq] flat token index
    row_valid = b_live[:, None] & (rows < cu_q_lens[b_seq + 1][:, None])
    row_pos = kv_lens[b_seq][:, None] - cu_q_lens[b_seq + 1][:, None] + rows  # absolute
    kv_len = kv_lens[b_seq]
    num_kv_blocks = (jnp.max(jnp.where(live, kv_lens, 0)) + block_tokens - 1) // block_tokens

    # [NB, kv_heads, Bq * group, D]: heads outermost so both matmuls batch over (block, head).
    qb = q[jnp.clip(rows, 0, num_tokens - 1)].astype(jnp.float32) * sm_scale
    qb = qb.reshape(num_q_blocks, q_block, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qb = qb.reshape(num_q_blocks, kv_heads, q_block * group, head_dim)

    def gather(cache, pages):
        x = cache[pages].reshape(num_q_blocks, block_tokens, kv_heads, head_dim)
        return x.astype(jnp.float32).transpose(0, 2, 1, 3)  # [NB, kv_heads, K, D]

    def body(block, carry):
        m, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(page_table, block * block_pages, block_pages, 1)
        pages = pages[b_seq]  # [NB, block_pages]
        k, v = gather(k_cache, pages), gather(v_cache, pages)
        # A column of ones after V makes the softmax denominator come out of the same
        # matmul as p @ V: summed in the same order whatever the batch's shape (a
        # separate p.sum() takes shape-dependent CPU code paths and breaks bitwise
        # batch invariance).
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
        s = jnp.einsum("nhrd,nhkd->nhrk", qb, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        mask = (k_pos[None, None, :] <= row_pos[:, :, None]) & (
            k_pos[None, None, :] < kv_len[:, None, None])
        if sliding_window is not None:
            mask &= k_pos[None, None, :] > row_pos[:, :, None] - sliding_window
        mask &= row_valid[:, :, None]
        mask = jnp.repeat(mask, group, axis=1)[:, None]  # rows are (token, group) pairs
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        acc = acc * alpha[..., None] + jnp.einsum("nhrk,nhkd->nhrd", p, v)
        return m_new, acc

    rows_per_block = q_block * group
    init = (
        jnp.full((num_q_blocks, kv_heads, rows_per_block), -jnp.inf, jnp.float32),
        jnp.zeros((num_q_blocks, kv_heads, rows_per_block, head_dim + 1), jnp.float32),
    )
    _, acc = jax.lax.fori_loop(0, num_kv_blocks, body, init)
    acc, denom = acc[..., :head_dim], acc[..., head_dim]
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    out = out.reshape(num_q_blocks, kv_heads, q_block, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_q_blocks * q_block, q_heads, head_dim)
    # Back to the flat token axis; padding rows go past the end and are dropped, so
    # padding tokens keep their zeros.
    dest = jnp.where(row_valid, rows, num_tokens).reshape(-1)
    result = jnp.zeros((num_tokens, q_heads, head_dim), jnp.float32)
    return result.at[dest].set(out, mode="drop").astype(q.dtype)
