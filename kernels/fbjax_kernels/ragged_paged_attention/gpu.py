"""Ragged paged attention as a Pallas kernel for NVIDIA GPUs (Triton lowering).

Same signature and semantics as :func:`fbjax_kernels.ragged_paged_attention.reference.
ragged_paged_attention`: ``q`` is a ragged batch ``[tokens, q_heads, head_dim]``,
the context lives in a paged cache ``[num_pages, page_size, kv_heads, head_dim]``,
``kv_lens[s]`` counts sequence ``s``'s context *including* this step's tokens, and
padding tokens past ``cu_q_lens[num_seqs]`` get zeros. This kernel only reads the
cache: this step's K/V are written beforehand by the shared companion update op
:func:`fbjax_kernels.ragged_paged_attention.write_kv` (a scatter through ``slot_mapping``),
exactly as for the reference.

Design (the vLLM "unified" Triton attention / FlashAttention-2 layout):

* **Grid** ``(num_q_blocks, kv_heads)``. A *query block* is up to ``q_block``
  consecutive query tokens of one sequence; the block -> (sequence, first token,
  token count, absolute position) map is computed with jax.numpy outside the kernel
  and passed in as small int32 arrays, so one compiled kernel serves any mix of
  decodes, prompt chunks, idle and padding sequences in a fixed-shape bucket.
  Surplus blocks (the grid is sized for the worst case) have no rows and exit at once.
* **GQA packing.** A program owns one kv head and *all* of its ``group = q_heads //
  kv_heads`` query heads for every token of its block: its tile has ``block_m =
  q_block * group_pad`` rows (row ``r`` = token ``r // group_pad``, head ``r %
  group_pad``), so each K/V tile is loaded once per group and a decode step
  (``q_block = 1``) still feeds the tensor cores ``group`` rows instead of one.
* **Paged K/V loads.** The sequence's context is walked with a ``lax.fori_loop`` in
  tiles of ``kv_block_tokens`` keys at absolute positions. Each key's page comes from
  the page table (``pages[seq, pos // page_size]``) and its K/V row is gathered with a
  masked ``plgpu.load`` on pointer offsets, so the key tile is independent of the page
  size (pages of 16 fill a 64-key tile four at a time; a 16-key tile reads a quarter
  of a 64-token page). The trip count is dynamic: causal skipping stops at the
  block's last query position and a sliding window starts at its first visible key,
  so a decode over a short context never touches the page table's unused tail.
* **Online softmax** in float32 with exp2 (log2(e) folded into the scale), finite
  mask value so fully masked tiles never produce NaNs, one division at the end.
  ``q . k`` and ``p . v`` run on the tensor cores in the input dtype (bfloat16 /
  float16 ``p`` is rounded to the input dtype as in FlashAttention; float32 inputs
  stay float32) with float32 accumulation.
* **Triton shapes.** Every tile dimension is a power of two and at least 16 (the
  ``tl.dot`` minimum): the head group, ``head_dim`` and the query-row count are padded
  up and the padding lanes masked on load and store; ``q_block`` and
  ``kv_block_tokens`` are rounded up to powers of two. Page size and head_dim
  themselves need not be powers of two.
* **Output.** The kernel writes only real rows into a zero-initialised buffer it
  aliases (``input_output_aliases``), so padding tokens read zero without an extra
  pass over the output.

On a machine without a GPU (``jax.default_backend() != "gpu"``) ``interpret``
defaults to True and the same kernel runs in the generic Pallas interpreter, which
is how CI checks its logic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fbjax_kernels.ragged_paged_attention.validation import check_attention_args

# Keys per inner-loop iteration (the tl.dot N dimension).
DEFAULT_KV_BLOCK_TOKENS = 64
# Target rows (query tokens x packed heads) per program when the bucket has long
# query blocks; decode blocks use one token and max(16, group) rows.
DEFAULT_BLOCK_M = 64
# tl.dot needs M, N and K of at least 16.
_MIN_DOT = 16
# Finite "minus infinity": exp2(mask - m) underflows to exactly 0 without NaNs from
# (-inf) - (-inf) when a row sees no key in a tile.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"ragged_paged_attention: argument '{name}' {msg}")


def _check_options(sm_scale, sliding_window, soft_cap, kv_block_tokens, q_block,
                   num_warps, num_stages) -> None:
    if sm_scale is not None and not np.isfinite(sm_scale):
        _fail("sm_scale", f"must be finite, got {sm_scale}")
    if sliding_window is not None and int(sliding_window) < 1:
        _fail("sliding_window", f"must be >= 1 (keys visible, itself included), "
              f"got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        _fail("soft_cap", f"must be > 0, got {soft_cap}")
    if int(kv_block_tokens) < 1:
        _fail("kv_block_tokens", f"must be >= 1, got {kv_block_tokens}")
    if q_block is not None and int(q_block) < 1:
        _fail("q_block", f"must be >= 1, got {q_block}")
    for name, x in (("num_warps", num_warps), ("num_stages", num_stages)):
        if x is not None and int(x) < 1:
            _fail(name, f"must be >= 1, got {x}")


def _query_blocks(cu_q_lens, kv_lens, num_seqs, *, num_tokens: int, q_block: int):
    """Per query block: sequence, first flat token, token count, absolute position.

    Sequence ``s`` is cut into ``ceil(q_len / q_block)`` blocks, in order; blocks past
    the last real one have zero tokens. The static block count covers the worst case:
    every block holds at least one token, and each sequence adds at most one partial
    block.
    """
    max_seqs = kv_lens.shape[0]
    live = jnp.arange(max_seqs, dtype=jnp.int32) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks_per_seq = (q_lens + q_block - 1) // q_block
    ends = jnp.cumsum(blocks_per_seq)
    firsts = ends - blocks_per_seq
    num_blocks = max(1, min(num_tokens, -(-num_tokens // q_block) + max_seqs))
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, b, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    start = cu_q_lens[seq] + (b - firsts[seq]) * q_block
    rows = jnp.where(b < ends[-1], jnp.minimum(q_block, cu_q_lens[seq + 1] - start), 0)
    rows = jnp.maximum(rows, 0)
    pos = kv_lens[seq] - q_lens[seq] + (start - cu_q_lens[seq])
    return num_blocks, seq, start, rows.astype(jnp.int32), pos.astype(jnp.int32)


def _attention_kernel(
    # inputs
    blk_seq_ref,  # [num_blocks] sequence of each query block
    blk_start_ref,  # [num_blocks] first flat token
    blk_rows_ref,  # [num_blocks] tokens in the block (0: surplus block)
    blk_pos_ref,  # [num_blocks] absolute position of the first token
    kv_lens_ref,  # [max_seqs]
    pages_ref,  # [max_seqs, pages_per_seq]
    q_ref,  # [tokens, q_heads, head_dim]
    k_ref,  # [num_pages, page_size, kv_heads, head_dim]
    v_ref,  # [num_pages, page_size, kv_heads, head_dim]
    o_zeros_ref,  # aliased with o_ref
    # outputs
    o_ref,  # [tokens, q_heads, head_dim]
    *,
    group: int,
    group_pad: int,
    block_m: int,
    block_k: int,
    head_dim: int,
    head_dim_pad: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    allow_tf32: bool,
):
    del o_zeros_ref  # same buffer as o_ref: holds the zeros padding tokens keep
    num_tokens = q_ref.shape[0]
    page_size = k_ref.shape[1]
    pages_per_seq = pages_ref.shape[1]
    b = pl.program_id(0)
    kv_head = pl.program_id(1)

    seq = blk_seq_ref[b]
    start = blk_start_ref[b]
    n_rows = blk_rows_ref[b]
    pos0 = blk_pos_ref[b]
    kv_len = kv_lens_ref[seq]

    # Tile rows: row r is query token r // group_pad of the block, head r % group_pad
    # of this kv head's group (group_pad is a power of two: shifts and masks).
    r = lax.iota(jnp.int32, block_m)
    tok_in_blk = lax.shift_right_logical(r, int(math.log2(group_pad)))
    g = lax.bitwise_and(r, group_pad - 1)
    row_ok = (tok_in_blk < n_rows) & (g < group)
    row_pos = pos0 + tok_in_blk  # absolute position of each row's token
    head = kv_head * group + jnp.minimum(g, group - 1)

    d = lax.iota(jnp.int32, head_dim_pad)
    d_ok = d < head_dim
    d_idx = jnp.minimum(d, head_dim - 1)

    q_mask = row_ok[:, None] & d_ok[None, :]
    tok = jnp.where(row_ok, start + tok_in_blk, 0)
    q = plgpu.load(q_ref.at[tok[:, None], head[:, None], d_idx[None, :]],
                   mask=q_mask, other=0)  # [block_m, head_dim_pad]

    # Key tiles this block needs: up to its last token (causal) and from the first
    # token's window start; tiles sit at absolute positions (multiples of block_k).
    hi = jnp.where(n_rows > 0, jnp.minimum(kv_len, pos0 + n_rows), 0)
    first_tile = 0
    if sliding_window is not None:
        first_tile = lax.div(jnp.maximum(pos0 - (sliding_window - 1), 0), block_k)
    end_tile = lax.div(hi + (block_k - 1), block_k)

    kk = lax.iota(jnp.int32, block_k)
    scale = sm_scale if soft_cap is None else sm_scale / soft_cap

    def load_kv(cache_ref, page, offset, k_ok):
        return plgpu.load(
            cache_ref.at[page[:, None], offset[:, None], kv_head, d_idx[None, :]],
            mask=k_ok[:, None] & d_ok[None, :], other=0)  # [block_k, head_dim_pad]

    def body(tile, carry):
        m_i, l_i, acc = carry
        k_pos = tile * block_k + kk
        k_ok = k_pos < kv_len
        col = jnp.minimum(lax.div(k_pos, page_size), pages_per_seq - 1)
        page = plgpu.load(pages_ref.at[seq, col], mask=k_ok, other=0)
        page = jnp.where(k_ok, page, 0)
        offset = lax.rem(k_pos, page_size)
        k = load_kv(k_ref, page, offset, k_ok)
        s = plgpu.dot(q, k, trans_b=True, allow_tf32=allow_tf32) * scale  # [bm, bk] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s)
        s = s * _LOG2E
        visible = k_ok[None, :] & (k_pos[None, :] <= row_pos[:, None])
        if sliding_window is not None:
            visible &= k_pos[None, :] > row_pos[:, None] - sliding_window
        s = jnp.where(visible, s, _MASK_VALUE)

        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_i * alpha + jnp.sum(p, axis=1)
        v = load_kv(v_ref, page, offset, k_ok)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=allow_tf32)
        return m_new, l_new, acc

    init = (
        jnp.full((block_m,), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
        jnp.zeros((block_m, head_dim_pad), jnp.float32),
    )
    _, l_i, acc = lax.fori_loop(first_tile, end_tile, body, init)
    out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]

    # Masked lanes point one token past the end: never written (an out-of-range
    # scatter is dropped in the interpreter, a masked store on the GPU).
    tok_out = jnp.where(q_mask, (start + tok_in_blk)[:, None], num_tokens)
    plgpu.store(o_ref.at[tok_out, head[:, None], d_idx[None, :]],
                out.astype(o_ref.dtype), mask=q_mask)


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
    num_warps: int | None = None,
    num_stages: int | None = None,
    allow_tf32: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of a ragged batch over a paged cache; returns [tokens, q_heads, head_dim].

    Padding tokens (past ``cu_q_lens[num_seqs]``) get zeros. Tuning knobs:
    ``kv_block_tokens`` keys per loop iteration and ``q_block`` query tokens per program
    (both rounded up to powers of two; default ``q_block``: the bucket's tokens per
    sequence, capped so a tile has about ``DEFAULT_BLOCK_M`` rows), ``num_warps`` and
    ``num_stages`` for Triton; ``allow_tf32`` lets float32 inputs use TF32 tensor
    cores (faster, ~1e-3 relative error; off by default so float32 matches the
    reference to 1e-5). ``interpret`` defaults to True off GPU.
    """
    check_attention_args(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    _check_options(sm_scale, sliding_window, soft_cap, kv_block_tokens, q_block,
                   num_warps, num_stages)
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    max_seqs = kv_lens.shape[0]
    if num_tokens == 0 or max_seqs == 0:  # nothing to attend: an empty grid
        return jnp.zeros(q.shape, q.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if sm_scale is None:
        sm_scale = head_dim**-0.5

    group = q_heads // kv_heads
    group_pad = _next_pow2(group)
    head_dim_pad = max(_MIN_DOT, _next_pow2(head_dim))
    block_k = max(_MIN_DOT, _next_pow2(kv_block_tokens))
    if q_block is None:
        per_seq = _next_pow2(max(1, num_tokens // max_seqs))
        q_block = min(per_seq, max(1, DEFAULT_BLOCK_M // group_pad))
    q_block = _next_pow2(q_block)
    block_m = max(_MIN_DOT, q_block * group_pad)
    if num_warps is None:
        num_warps = 4 if block_m * head_dim_pad <= 64 * 128 else 8
    if num_stages is None:
        num_stages = 2

    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    kv_lens = kv_lens.astype(jnp.int32)
    page_indices = page_indices.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_blocks, blk_seq, blk_start, blk_rows, blk_pos = _query_blocks(
        cu_q_lens, kv_lens, num_seqs, num_tokens=num_tokens, q_block=q_block)

    kernel = functools.partial(
        _attention_kernel,
        group=group,
        group_pad=group_pad,
        block_m=block_m,
        block_k=block_k,
        head_dim=head_dim,
        head_dim_pad=head_dim_pad,
        sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        allow_tf32=bool(allow_tf32),
    )
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_blocks, kv_heads),
        input_output_aliases={9: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(blk_seq, blk_start, blk_rows, blk_pos, kv_lens, page_indices, q, k_cache, v_cache,
      jnp.zeros(q.shape, q.dtype))


__all__ = ["ragged_paged_attention", "DEFAULT_KV_BLOCK_TOKENS"]
