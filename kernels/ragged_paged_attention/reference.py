"""Ragged paged attention in plain jax.numpy: the ground truth every kernel is tested against.

A *ragged* batch packs the query tokens of many sequences on one flat axis: sequence
``s`` owns tokens ``cu_q_lens[s]:cu_q_lens[s+1]``. Its keys and values live in a paged
cache (``[num_pages, page_size, kv_heads, head_dim]``) at the pages listed in row ``s`` of
``page_indices``; ``kv_lens[s]`` counts its context *including* this step's tokens, which
are already written to the cache (see :func:`write_kv`). A query token at absolute
position ``p`` sees keys ``0..p`` of its own sequence (causal), so a prompt chunk sees the
cached prefix plus itself and a decode token sees everything before it.

The loop walks the context in blocks of whole pages with an online softmax, the same
order of operations the Pallas kernels use. Its trip count is the longest context in
the batch, not the page table's width, so a decode step over short sequences does not
pay for the model's maximum context. Block boundaries sit at absolute key positions,
so a sequence's result is the same whether its prompt was prefilled at once or in
chunks, alone or beside others (batch invariance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.ragged_paged_attention.validation import check_attention_args, check_write_args

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
    k_flat = k_cache.reshape(flat_shape).at[slot_mapping].set(
        new_k.astype(k_cache.dtype), mode="drop"
    )
    v_flat = v_cache.reshape(flat_shape).at[slot_mapping].set(
        new_v.astype(v_cache.dtype), mode="drop"
    )
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def token_layout(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per flat token: its sequence, its absolute position, and whether it is real."""
    max_seqs = kv_lens.shape[0]
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], tok, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    valid = tok < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (tok - cu_q_lens[seq])
    return seq, q_pos, valid


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
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())

    block_pages = max(1, min(pages_per_seq, kv_block_tokens // page_size))
    num_blocks_max = -(-pages_per_seq // block_pages)
    padded_pages = num_blocks_max * block_pages
    page_table = jnp.pad(page_indices, ((0, 0), (0, padded_pages - pages_per_seq)))
    block_tokens = block_pages * page_size

    seq, q_pos, valid = token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    kv_len = kv_lens[seq]
    live_kv = jnp.where(jnp.arange(max_seqs) < num_seqs, kv_lens, 0)
    num_blocks = (jnp.max(live_kv) + block_tokens - 1) // block_tokens

    qf = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim) * sm_scale

    def body(block, carry):
        m, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(page_table, block * block_pages, block_pages, 1)
        pages = pages[seq]  # [T, block_pages]
        k = k_cache[pages].reshape(num_tokens, block_tokens, kv_heads, head_dim)
        v = v_cache[pages].reshape(num_tokens, block_tokens, kv_heads, head_dim)
        # A column of ones after V makes the softmax denominator (sum of p) come out of
        # the same matmul as p @ V, so it is summed in the same order whatever the token
        # count; a separate p.sum() goes to shape-dependent CPU reduction code and breaks
        # bitwise batch invariance.
        v = jnp.concatenate(
            [v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1
        )
        s = jnp.einsum("thgd,tkhd->thgk", qf, k.astype(jnp.float32))
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        mask &= valid[:, None]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        acc = acc * alpha[..., None] + jnp.einsum("thgk,tkhd->thgd", p, v)
        return m_new, acc

    init = (
        jnp.full((num_tokens, kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group, head_dim + 1), jnp.float32),
    )
    _, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    acc, denom = acc[..., :head_dim], acc[..., head_dim]
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, q_heads, head_dim).astype(q.dtype)
