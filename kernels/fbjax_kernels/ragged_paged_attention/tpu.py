"""Ragged paged attention as a Pallas Mosaic TPU kernel.

Same signature and semantics as :func:`fbjax_kernels.ragged_paged_attention.reference.
ragged_paged_attention` (the ground truth); this module only computes attention. Writing
this step's K/V into the paged cache stays with the shared companion update op
:func:`fbjax_kernels.ragged_paged_attention.reference.write_kv`, which must run first.

Design
------
Queries are tiled as the reference tiles them: *query blocks* of ``q_block`` consecutive
tokens of one sequence (a sequence adds at most one partial block). A little jax.numpy
outside the kernel builds the block -> (sequence, first token, length) map and gathers
the queries into a head-major block layout ``[kv_heads, blocks, q_block * group,
head_dim]``: one gather that also puts each kv head's ``group`` query heads on the row
axis, so every matmul in the kernel is a plain 2-D ``[rows, D] x [D, keys]`` MXU matmul
with GQA folded into the rows. The output comes back in the same layout and one gather
returns it to the flat token axis (padding tokens get zeros).

Grid ``(kv_heads // kv_heads_block, query_blocks)``; no state crosses grid steps, so both
axes are ``parallel`` (megacore may split either). Per step:

* scalar-prefetched SMEM metadata: ``kv_lens``, the flattened page table,
  ``cu_q_lens``, ``num_seqs`` and the query-block map; from them the step derives the
  block's absolute query positions and the key range ``[lo, hi)`` it can see (causal:
  ``hi`` = last query position + 1; sliding window: ``lo`` = first position - window + 1).
* the query block arrives in VMEM through its ``BlockSpec`` (auto double-buffered across
  grid steps) and the output block leaves the same way.
* the K/V caches stay in HBM (``memory_space=ANY``). Keys are walked in blocks of
  ``kv_block_tokens // page_size`` whole pages, only over ``[lo, hi)``: blocks entirely
  outside are never visited, and inside a block only pages that overlap ``[lo, hi)`` are
  copied. Each page is one DMA of ``[page_size, kv_heads_block, head_dim]`` (contiguous in
  HBM when ``kv_heads_block == kv_heads``) into a two-slot VMEM buffer; the copy of
  block ``j + 1`` is issued before block ``j`` is computed (double buffering).
* per kv head: scores ``q @ k^T`` (f32 accumulation; bfloat16 operands stay bfloat16 on
  the MXU, anything else is computed in float32 at HIGHEST precision), soft cap,
  causal / window / length mask, online softmax with float32 running max, denominator
  and accumulator carried through the key loop. Values of pages that were not copied
  are zeroed before ``p @ v`` (the buffer may hold stale or uninitialised data and
  ``0 * nan`` is ``nan``).

The whole thing also runs on CPU in the Mosaic TPU interpreter
(``interpret=pltpu.InterpretParams()``), which is how the tests exercise it.

Limitations / what a real TPU would need tuned (only the interpreter has run it so far):

* Mosaic lowering risks: the per-head load ``k_buf[slot, :, :, h, :]`` indexes the
  second-minor (sublane) axis, and the ``[pages, page_size, D] -> [keys, D]`` reshape
  needs ``page_size`` to be a multiple of the sublane tile (8 for 32-bit, 16 for
  bfloat16). With the cache layout ``[pages, page_size, kv_heads, D]`` a small
  ``kv_heads_block`` also pads the VMEM buffers to whole sublane tiles; a head-major page
  layout would DMA and load better.
* The first key block of a grid step is not prefetched during the previous step, so its
  DMA latency is exposed once per query block (matters for decode).
* Decode blocks have ``group`` rows, far below the MXU's height (memory-bound anyway;
  packing several decode sequences per step would help). Grid steps are not load
  balanced: a long-context block costs far more than a short one.
* The flattened page table sits in SMEM (``max_seqs * pages_per_seq`` int32 words must
  fit); q and the output take one extra gather each outside the kernel.
* Block sizes (``kv_block_tokens``, ``q_block``, ``kv_heads_block``) are untuned guesses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fbjax_kernels.ragged_paged_attention.validation import check_attention_args

# Keys per inner-loop step. On TPU: 256 keys keep the MXU busy and each step's DMAs
# large, while the two-slot K and V buffers stay a few MiB of VMEM.
DEFAULT_KV_BLOCK_TOKENS = 256
# Default query tiling: at most this many (token, query head) rows per block, and as
# many kv heads per grid step as keep their float32 accumulators under this size.
MAX_DEFAULT_ROWS = 512
MAX_ACC_BYTES = 1 << 20


def _query_blocks(cu_q_lens, num_seqs, num_tokens: int, max_seqs: int, q_block: int):
    """Query-block map and token -> block-row map, in jax.numpy (runs outside the kernel).

    Returns ``blk_seq, blk_start, blk_len`` ([num_blocks] int32: the block's sequence,
    its first token's offset within that sequence and its number of real tokens, 0 for an
    unused block), ``tok_row`` ([tokens]: the token's row in the ``[num_blocks *
    q_block]`` block layout), ``tok_valid`` ([tokens] bool) and ``rows`` ([num_blocks,
    q_block]: flat token index of each block row, clipped into range).
    """
    live = jnp.arange(max_seqs) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks_per_seq = (q_lens + q_block - 1) // q_block
    block_end = jnp.cumsum(blocks_per_seq)
    first_block = block_end - blocks_per_seq
    # Each block holds >= 1 token and each sequence adds at most one partial block.
    num_blocks = min(num_tokens, -(-num_tokens // q_block) + max_seqs)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    blk_seq = jnp.minimum(jnp.searchsorted(block_end, b, side="right"), max_seqs - 1)
    blk_seq = blk_seq.astype(jnp.int32)
    blk_start = (b - first_block[blk_seq]) * q_block
    blk_len = jnp.where(b < block_end[-1],
                        jnp.clip(q_lens[blk_seq] - blk_start, 0, q_block), 0)
    rows = cu_q_lens[blk_seq][:, None] + blk_start[:, None] + jnp.arange(q_block)[None, :]
    rows = jnp.clip(rows, 0, num_tokens - 1)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    tok_valid = tok_seq < num_seqs
    tok_seq = jnp.minimum(tok_seq, max_seqs - 1)
    tok_row = first_block[tok_seq] * q_block + t - cu_q_lens[tok_seq]
    tok_row = jnp.clip(tok_row, 0, num_blocks * q_block - 1)
    return (blk_seq, blk_start.astype(jnp.int32), blk_len.astype(jnp.int32), tok_row,
            tok_valid, rows)


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref,
    page_table_ref,  # [max_seqs * pages_per_seq], flattened
    cu_q_lens_ref,
    num_seqs_ref,  # [1]
    blk_seq_ref,
    blk_start_ref,
    blk_len_ref,
    # inputs
    q_ref,  # VMEM [kv_heads_block, rows, D]
    k_hbm,  # HBM [num_pages, page_size, kv_heads, D]
    v_hbm,
    # output
    o_ref,  # VMEM [kv_heads_block, rows, D]
    # scratch
    k_buf,  # VMEM [2, block_pages, page_size, kv_heads_block, D]
    v_buf,
    sems,  # DMA semaphores [2 (k, v), 2 (slot)]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    pages_per_seq: int,
    num_pages: int,
):
    heads_block, rows, head_dim = q_ref.shape
    _, block_pages, page_size, _, _ = k_buf.shape
    block_tokens = block_pages * page_size
    h_blk = pl.program_id(0)
    b = pl.program_id(1)

    seq = blk_seq_ref[b]
    n_rows = blk_len_ref[b]
    kv_len = kv_lens_ref[seq]
    q_len = cu_q_lens_ref[seq + 1] - cu_q_lens_ref[seq]
    first_pos = kv_len - q_len + blk_start_ref[b]  # absolute position of row 0's token
    live = (n_rows > 0) & (seq < num_seqs_ref[0])
    # Keys this block can see: [lo, hi).
    hi = jnp.where(live, first_pos + n_rows, 0)
    if sliding_window is None:
        lo = jnp.int32(0)
    else:
        lo = jnp.clip(first_pos - sliding_window + 1, 0, hi)
    kv_blk_lo = lo // block_tokens
    num_kv_blocks = jnp.maximum((hi + block_tokens - 1) // block_tokens - kv_blk_lo, 0)

    first_page = lo // page_size  # pages [first_page, end_page) hold keys [lo, hi)
    end_page = (hi + page_size - 1) // page_size

    def page_copy(kv_blk, slot, p):
        """DMAs of page ``p`` of key block ``kv_blk`` into buffer slot ``slot``."""
        gp = kv_blk * block_pages + p  # page number within the sequence
        page = page_table_ref[seq * pages_per_seq + jnp.minimum(gp, pages_per_seq - 1)]
        page = jnp.clip(page, 0, num_pages - 1)
        heads = pl.ds(h_blk * heads_block, heads_block)
        return (
            pltpu.make_async_copy(
                k_hbm.at[page, :, heads, :], k_buf.at[slot, p], sems.at[0, slot]),
            pltpu.make_async_copy(
                v_hbm.at[page, :, heads, :], v_buf.at[slot, p], sems.at[1, slot]),
        )

    def for_needed_pages(kv_blk, fn):
        """``fn(p)`` for the pages ``p`` of key block ``kv_blk`` that overlap [lo, hi)."""
        base = kv_blk * block_pages
        p_lo = jnp.clip(first_page - base, 0, block_pages)
        p_hi = jnp.clip(end_page - base, p_lo, block_pages)

        def step(p, carry):
            fn(p)
            return carry

        lax.fori_loop(p_lo, p_hi, step, 0)

    def start_fetch(kv_blk, slot):
        def fn(p):
            for copy in page_copy(kv_blk, slot, p):
                copy.start()
        for_needed_pages(kv_blk, fn)

    def wait_fetch(kv_blk, slot):
        def fn(p):
            for copy in page_copy(kv_blk, slot, p):
                copy.wait()
        for_needed_pages(kv_blk, fn)

    @pl.when(num_kv_blocks > 0)
    def _():
        start_fetch(kv_blk_lo, 0)

    # Row r holds query head (r % group) of the block's token r // group.
    row_pos = first_pos + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
    compute_dtype = jnp.bfloat16 if (
        q_ref.dtype == jnp.bfloat16 and k_buf.dtype == jnp.bfloat16) else jnp.float32
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    q_all = q_ref[...].astype(compute_dtype)

    def body(i, carry):
        kv_blk = kv_blk_lo + i
        slot = i % 2

        @pl.when(i + 1 < num_kv_blocks)
        def _():
            start_fetch(kv_blk + 1, 1 - slot)

        wait_fetch(kv_blk, slot)
        k_pos = kv_blk * block_tokens + lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
        mask = (k_pos <= row_pos) & (k_pos < hi)
        if sliding_window is not None:
            mask &= k_pos > row_pos - sliding_window
        # Keys of pages that were copied in this step; the rest of the buffer is stale.
        k_pos_col = kv_blk * block_tokens + lax.broadcasted_iota(
            jnp.int32, (block_tokens, 1), 0)
        fetched = (k_pos_col >= first_page * page_size) & (k_pos_col < end_page * page_size)

        new_carry = []
        for h in range(heads_block):
            m_prev, l_prev, acc_prev = carry[h]
            # [block_pages, page_size, D] -> [keys, D]: merges whole sublane tiles.
            k = k_buf[slot, :, :, h, :].reshape(block_tokens, head_dim).astype(compute_dtype)
            v = v_buf[slot, :, :, h, :].reshape(block_tokens, head_dim).astype(compute_dtype)
            v = jnp.where(fetched, v, jnp.zeros_like(v))
            s = lax.dot_general(
                q_all[h], k, (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32, precision=precision) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m_prev - m_safe)
            l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(
                p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32, precision=precision)
            new_carry.append((m_new, l_new, alpha * acc_prev + pv))
        return tuple(new_carry)

    init = tuple(
        (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
         jnp.zeros((rows, head_dim), jnp.float32))
        for _ in range(heads_block))
    final = lax.fori_loop(0, num_kv_blocks, body, init)
    for h in range(heads_block):
        _, l_fin, acc = final[h]
        o_ref[h] = (acc / jnp.where(l_fin == 0.0, 1.0, l_fin)).astype(o_ref.dtype)


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
    kv_heads_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> jax.Array:
    """Attention of a ragged batch over a paged cache; returns [tokens, q_heads, head_dim].

    Same contract as the reference (padding tokens past ``cu_q_lens[num_seqs]`` get
    zeros). Tuning: ``kv_block_tokens`` keys per inner step (rounded down to whole pages),
    ``q_block`` tokens per query block (default ``tokens // max_seqs``),
    ``kv_heads_block`` kv heads per grid step (default all). ``interpret`` defaults to
    the Mosaic TPU interpreter when the default backend is not a TPU; pass an
    ``InterpretParams`` to tune the interpreter.
    """
    check_attention_args(q, k_cache, v_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_cache.shape
    max_seqs, pages_per_seq = page_indices.shape
    group = q_heads // kv_heads
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    if q_block is None:
        # The reference's tiling, capped so a block's rows fit the MXU's sweet spot.
        q_block = min(max(1, num_tokens // max_seqs), max(1, MAX_DEFAULT_ROWS // group))
    if q_block < 1:
        raise ValueError(f"ragged_paged_attention: q_block must be >= 1, got {q_block}")
    if kv_heads_block is None:
        # As many kv heads per step as keep the step's float32 accumulators small.
        rows_bytes = min(q_block, max(num_tokens, 1)) * group * head_dim * 4
        kv_heads_block = max([d for d in range(1, kv_heads + 1) if kv_heads % d == 0
                              and (d == 1 or d * rows_bytes <= MAX_ACC_BYTES)])
    if kv_heads_block < 1 or kv_heads % kv_heads_block:
        raise ValueError(f"ragged_paged_attention: kv_heads_block {kv_heads_block} must "
                         f"divide kv_heads {kv_heads}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"ragged_paged_attention: sliding_window must be >= 1, "
                         f"got {sliding_window}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if interpret is True:
        interpret = pltpu.InterpretParams()
    elif interpret is False:
        interpret = None
    if num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)
    q_block = min(q_block, num_tokens)
    block_pages = max(1, min(pages_per_seq, kv_block_tokens // page_size))

    i32 = jnp.int32
    kv_lens = kv_lens.astype(i32)
    cu_q_lens = cu_q_lens.astype(i32)
    num_seqs = jnp.asarray(num_seqs, i32).reshape((1,))
    blk_seq, blk_start, blk_len, tok_row, tok_valid, rows = _query_blocks(
        cu_q_lens, num_seqs[0], num_tokens, max_seqs, q_block)
    num_blocks = blk_seq.shape[0]
    rows_per_block = q_block * group

    # [kv_heads, blocks, q_block * group, D]: a kv head's query heads share its rows.
    q_blocks = q[rows].reshape(num_blocks, q_block, kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(2, 0, 1, 3, 4).reshape(
        kv_heads, num_blocks, rows_per_block, head_dim)

    kernel = functools.partial(
        _kernel, sm_scale=float(sm_scale), sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap), group=group,
        pages_per_seq=pages_per_seq, num_pages=num_pages)
    qo_spec = pl.BlockSpec((kv_heads_block, pl.Squeezed(), rows_per_block, head_dim),
                           lambda h, b, *_: (h, b, 0, 0))
    kv_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf_shape = (2, block_pages, page_size, kv_heads_block, head_dim)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7,
        grid=(kv_heads // kv_heads_block, num_blocks),
        in_specs=[qo_spec, kv_spec, kv_spec],
        out_specs=qo_spec,
        scratch_shapes=[
            pltpu.VMEM(buf_shape, k_cache.dtype),
            pltpu.VMEM(buf_shape, v_cache.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
        ],
    )
    out_blocks = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"),
            vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(kv_lens, page_indices.astype(i32).reshape(-1), cu_q_lens, num_seqs, blk_seq,
      blk_start, blk_len, q_blocks, k_cache, v_cache)

    # Back to the flat token axis; padding tokens get zeros.
    out = out_blocks.reshape(kv_heads, num_blocks * q_block, group, head_dim)[:, tok_row]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, q_heads, head_dim)
    return jnp.where(tok_valid[:, None, None], out, jnp.zeros((), q.dtype))
