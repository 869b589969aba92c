"""Ragged paged attention for XLA on CPU: the reference's maths, split for speed.

Same signature and results as :mod:`~fbjax_kernels.ragged_paged_attention.reference` (up to
float rounding), organised around what XLA does well on a CPU: few ops per step, few
gathers, large matmuls where there is work for them, and no page gathers for query
tokens that have nothing to read.

Sequences are handled by kind, and each query token's keys are reduced with online
softmax statistics (max, sum, weighted values) that are merged at the end:

* **decodes** (one query token): the whole context, read through the page table in
  blocks of whole pages as in the reference, one query row block per sequence. This is
  all a decode-only step runs.
* **chunks** (two query tokens or more: prompts and prompt chunks) split their keys
  in two disjoint sets:

  - the keys this very step wrote (the chunk up to the token itself), read back from
    the cache with one gather of ``tokens`` rows and attended densely: one
    ``[tile * group, tile]`` matmul per kv head and tile pair with a block-diagonal
    causal mask. Query tiles of ``SELF_TILE`` tokens skip key tiles left of their first
    sequence and right of themselves. A fresh prompt is prefilled entirely here,
    without page gathers.
  - the cached prefix (``kv_len - q_len`` keys), read through the page table like the
    decodes, in query blocks of ``CHUNK_Q_BLOCK`` tokens; only chunks that have one.

Blocks of the paged passes are processed in groups whose loop runs to the group's own
longest context, and a group only exists if it has work, so a fresh prompt in a mixed
batch costs the decodes beside it nothing (and vice versa). Keys sit at absolute
positions (paged blocks start at position 0), so a sequence's result does not depend
on its neighbours; it differs from a one-chunk prefill, or from the same sequence in
another bucket, only in the order of float sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbjax_kernels.ragged_paged_attention.validation import check_attention_args

DEFAULT_KV_BLOCK_TOKENS = 128
# Query tile of the dense part over this step's own keys (tokens).
SELF_TILE = 64
# Query tokens per block of a multi-token chunk that has a cached prefix.
CHUNK_Q_BLOCK = 16
# Query blocks processed together by the paged passes: one page gather (per K and V)
# and one pair of score / value products per key block for the whole group.
DECODE_GROUP = 32
CHUNK_GROUP = 4

_NEG_INF = -jnp.inf


def _online_update(carry, s, pv):
    """Fold scores ``s`` [..., K] (masked entries -inf) into ``carry`` = (max, sum, acc)."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, denom * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv(p)


def _merge(a, b):
    """Combine two (max, sum, acc) statistics of disjoint key sets."""
    m = jnp.maximum(a[0], b[0])
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    wa, wb = jnp.exp(a[0] - m_safe), jnp.exp(b[0] - m_safe)
    return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def _init_stats(shape, head_dim):
    return (jnp.full(shape, _NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))


def _take_rows(x, idx):
    """``x[idx]`` along axis 0, as one row gather of a 2-D view (fastest on XLA CPU)."""
    flat = x.reshape(x.shape[0], -1)
    out = jnp.take(flat, idx, axis=0, mode="clip")
    return out.reshape(*idx.shape, *x.shape[1:])


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

    Padding tokens (past ``cu_q_lens[num_seqs]``) get zeros. ``q_block`` sets the query
    block of chunks with a cached prefix (default ``CHUNK_Q_BLOCK``).
    """
    check_attention_args(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    max_seqs, pages_per_seq = page_indices.shape
    group = q_heads // kv_heads
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    page_indices = page_indices.astype(jnp.int32)

    def score(s):
        return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)

    # ---- sequences and tokens
    live = jnp.arange(max_seqs) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    kv_lens = jnp.where(live, kv_lens, 0)
    prefix_lens = kv_lens - q_lens  # cached keys before this step's chunk
    seq_start = cu_q_lens[:-1]
    decodes = live & (q_lens == 1)
    chunks = live & (q_lens > 1)
    # The token axis, padded to whole self tiles.
    tile = min(num_tokens, SELF_TILE)
    num_tiles = -(-num_tokens // tile)
    padded_tokens = num_tiles * tile
    qf = q.astype(jnp.float32) * sm_scale  # [T, QH, D]
    qf = jnp.pad(qf, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))

    # ---- the paged passes
    block_pages = max(1, min(pages_per_seq, kv_block_tokens // page_size))
    num_kv_blocks_max = -(-pages_per_seq // block_pages)
    page_table = jnp.pad(
        page_indices, ((0, 0), (0, num_kv_blocks_max * block_pages - pages_per_seq)))
    block_tokens = block_pages * page_size
    k_pages = k_cache.reshape(k_cache.shape[0], -1)  # one row per page
    v_pages = v_cache.reshape(v_cache.shape[0], -1)

    def paged_pass(state, selected, limits, q_block, max_blocks, group_blocks):
        """Each token of the ``selected`` sequences attends to the keys at positions
        ``< limits[seq]`` (and its window), in query blocks of ``q_block`` tokens (at
        most ``max_blocks``), ``group_blocks`` blocks at a time. Their (max, sum, acc)
        [T, KVH, group(, D)] are written into ``state``; other tokens keep theirs."""
        group_blocks = min(group_blocks, max_blocks)
        rows_per_block = q_block * group
        blocks_per_seq = jnp.where(selected, (q_lens + q_block - 1) // q_block, 0)
        blocks_end = jnp.cumsum(blocks_per_seq)
        first_block = blocks_end - blocks_per_seq
        num_blocks = blocks_end[-1]

        def gather(pages_2d, pages):
            x = _take_rows(pages_2d, pages).reshape(group_blocks, block_tokens, kv_heads,
                                                    head_dim)
            return x.astype(jnp.float32).transpose(0, 2, 1, 3)  # [GB, KVH, K, D]

        def group_body(g, state):
            b = g * group_blocks + jnp.arange(group_blocks, dtype=jnp.int32)
            b_seq = jnp.sum(blocks_end[None, :] <= b[:, None], axis=1, dtype=jnp.int32)
            b_seq = jnp.minimum(b_seq, max_seqs - 1)
            b_live = b < num_blocks
            rows = (seq_start[b_seq] + (b - first_block[b_seq]) * q_block)[:, None] + (
                jnp.arange(q_block, dtype=jnp.int32)[None, :])  # [GB, Bq] flat token
            row_valid = b_live[:, None] & (rows < cu_q_lens[b_seq + 1][:, None])
            b_limit = jnp.where(b_live, limits[b_seq], 0)
            # rows that see no key get -inf scores everywhere (then max -inf, sum 0)
            row_limit = jnp.where(row_valid, b_limit[:, None], 0)
            row_pos = (prefix_lens[b_seq][:, None] + rows
                       - seq_start[b_seq][:, None])  # absolute position
            dest = jnp.where(row_valid, rows, padded_tokens)  # invalid rows: dropped
            g_table = page_table[b_seq]  # [GB, pages]
            g_q = _take_rows(qf, jnp.minimum(dest, padded_tokens - 1))  # [GB, Bq, QH, D]
            g_q = g_q.reshape(group_blocks, q_block, kv_heads, group, head_dim)
            g_q = g_q.transpose(0, 2, 1, 3, 4).reshape(group_blocks, kv_heads,
                                                       rows_per_block, head_dim)

            def kv_body(blk, carry):
                pages = jax.lax.dynamic_slice_in_dim(g_table, blk * block_pages,
                                                     block_pages, 1)
                if q_block == 1:
                    # One query token per block (group rows per kv head): a fused
                    # multiply-reduce over the keys in their cache layout instead of a
                    # transpose + tiny batched matmuls (up to ~10% of a decode step on
                    # a loaded 2-core CPU, never slower in our measurements).
                    k = _take_rows(k_pages, pages).reshape(
                        group_blocks, block_tokens, kv_heads, head_dim).astype(jnp.float32)
                    s = jnp.sum(g_q[:, None] * k[:, :, :, None, :], axis=-1)  # [GB,K,KVH,G]
                    s = score(s.transpose(0, 2, 3, 1))
                else:
                    s = score(jnp.einsum("nhrd,nhkd->nhrk", g_q, gather(k_pages, pages)))
                v = gather(v_pages, pages)
                k_pos = blk * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
                mask = k_pos[None, None, :] < row_limit[:, :, None]  # [GB, Bq, K]
                if sliding_window is not None:
                    mask &= k_pos[None, None, :] > row_pos[:, :, None] - sliding_window
                bias = jnp.where(mask, 0.0, _NEG_INF)[:, None, :, None, :]
                s = (s.reshape(group_blocks, kv_heads, q_block, group, block_tokens)
                     + bias).reshape(s.shape)
                return _online_update(carry, s,
                                      lambda p: jnp.einsum("nhrk,nhkd->nhrd", p, v))

            trips = (jnp.max(b_limit) + block_tokens - 1) // block_tokens
            out = jax.lax.fori_loop(
                0, trips, kv_body,
                _init_stats((group_blocks, kv_heads, rows_per_block), head_dim))
            # [GB, KVH, Bq * group(, D)] -> rows [GB * Bq, KVH, group(, D)] -> tokens
            new = []
            for x, o in zip(state, out, strict=True):
                o = o.reshape(group_blocks, kv_heads, q_block, group, *o.shape[3:])
                o = jnp.moveaxis(o, 1, 2).reshape(group_blocks * q_block, *x.shape[1:])
                new.append(x.at[dest.reshape(-1)].set(o, mode="drop"))
            return tuple(new)

        num_groups = (num_blocks + group_blocks - 1) // group_blocks
        return jax.lax.fori_loop(0, num_groups, group_body, state)

    def self_part(state):
        """Chunk tokens against the keys this step wrote for their own chunk, merged
        into ``state``. Other tokens' rows are fully masked (their state is kept)."""
        seq_end = jnp.where(live, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
        t = jnp.arange(padded_tokens, dtype=jnp.int32)
        tok_valid = t < cu_q_lens[num_seqs]
        # sequence of token t: the number of live sequences that end at or before it
        tok_seq = jnp.sum(seq_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
        tok_seq = jnp.minimum(tok_seq, max_seqs - 1)
        tok_chunk = tok_valid & chunks[tok_seq]
        tok_pos = jnp.where(tok_valid, prefix_lens[tok_seq] + t - seq_start[tok_seq], 0)
        slot = page_indices[tok_seq, tok_pos // page_size] * page_size + tok_pos % page_size
        flat_shape = (-1, kv_heads, head_dim)
        k_self = _take_rows(k_cache.reshape(flat_shape), slot).astype(jnp.float32)
        v_self = _take_rows(v_cache.reshape(flat_shape), slot).astype(jnp.float32)
        k_self, v_self = k_self.transpose(1, 0, 2), v_self.transpose(1, 0, 2)  # [KVH, T, D]
        q_self = qf.reshape(padded_tokens, kv_heads, group, head_dim).transpose(1, 0, 2, 3)
        q_self = q_self.reshape(kv_heads, padded_tokens * group, head_dim)  # (token, group)

        def block(q_rows, q_idx, k_start, carry):
            """Rows of tokens ``q_idx`` [tile] against this step's keys k_start..+tile."""
            k_idx = k_start + jnp.arange(tile, dtype=jnp.int32)
            k = jax.lax.dynamic_slice_in_dim(k_self, k_start, tile, axis=1)
            v = jax.lax.dynamic_slice_in_dim(v_self, k_start, tile, axis=1)
            s = score(jnp.einsum("hrd,hkd->hrk", q_rows, k))
            mask = ((tok_seq[q_idx][:, None] == tok_seq[k_idx][None, :])
                    & (k_idx[None, :] <= q_idx[:, None]) & tok_chunk[q_idx][:, None])
            if sliding_window is not None:
                mask &= tok_pos[k_idx][None, :] > tok_pos[q_idx][:, None] - sliding_window
            bias = jnp.where(mask, 0.0, _NEG_INF)[:, None, :]  # [tile, 1 (group), tile]
            s = (s.reshape(kv_heads, tile, group, tile) + bias).reshape(s.shape)
            return _online_update(carry, s, lambda p: jnp.einsum("hrk,hkd->hrd", p, v))

        init = _init_stats((kv_heads, tile * group), head_dim)
        if num_tiles == 1:
            m, denom, acc = block(q_self, t, 0, init)
        else:
            def one_tile(i):
                q_idx = i * tile + jnp.arange(tile, dtype=jnp.int32)
                q_rows = jax.lax.dynamic_slice_in_dim(q_self, i * tile * group,
                                                      tile * group, 1)
                # key tiles from the one holding the first token's sequence start to
                # this one; none if the tile has no chunk token
                first = seq_start[tok_seq[i * tile]] // tile
                last = jnp.where(jnp.any(tok_chunk[q_idx]), i + 1, first)
                return jax.lax.fori_loop(
                    first, last, lambda j, c: block(q_rows, q_idx, j * tile, c), init)

            m, denom, acc = jax.lax.map(one_tile, jnp.arange(num_tiles, dtype=jnp.int32))
            # [tiles, KVH, rows(, D)] -> [KVH, tiles * rows(, D)]
            m, denom = (x.transpose(1, 0, 2).reshape(kv_heads, -1) for x in (m, denom))
            acc = acc.transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)
        # -> [T, KVH, group(, D)]
        m, denom = (x.reshape(kv_heads, padded_tokens, group).transpose(1, 0, 2)
                    for x in (m, denom))
        acc = acc.reshape(kv_heads, padded_tokens, group, head_dim).transpose(1, 0, 2, 3)
        return _merge(state, (m, denom, acc))

    state = _init_stats((padded_tokens, kv_heads, group), head_dim)
    # decodes: the whole context, their own key included (already in the cache)
    state = paged_pass(state, decodes, kv_lens, 1, min(max_seqs, num_tokens), DECODE_GROUP)
    if num_tokens >= 2:
        # chunks: the cached prefix (each chunk adds at most one partial block)
        chunk_q_block = min(q_block or CHUNK_Q_BLOCK, num_tokens)
        max_chunk_blocks = min(num_tokens, num_tokens // chunk_q_block
                               + min(max_seqs, num_tokens // 2))
        state = paged_pass(state, chunks & (prefix_lens > 0), prefix_lens, chunk_q_block,
                           max_chunk_blocks, CHUNK_GROUP)
        # chunks: this step's own keys, dense; skipped when the step has no chunk
        state = jax.lax.cond(jnp.any(chunks), self_part, lambda s: s, state)
    m, denom, acc = state
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # padding: 0 / 1
    return out[:num_tokens].reshape(num_tokens, q_heads, head_dim).astype(q.dtype)

