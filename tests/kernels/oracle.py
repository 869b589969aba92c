"""A deliberately naive NumPy oracle for ragged paged attention, and a batch generator.

The oracle shares no code with ``kernels/``: it loops over sequences and query tokens in
Python, works in float64, reads keys and values position by position through the page
table, and builds the causal / sliding-window mask explicitly. It is slow on purpose;
every attention implementation (the jax.numpy reference, Pallas GPU and TPU kernels) is
checked against it.

Conventions (the same as ``fbjax_kernels.ragged_paged_attention``):

* ``q`` is ``[num_tokens, q_heads, head_dim]``; sequence ``s`` owns the flat tokens
  ``cu_q_lens[s]:cu_q_lens[s + 1]``; tokens past ``cu_q_lens[num_seqs]`` are padding and
  their output is zero.
* ``kv_lens[s]`` is the context length *including* this step's query tokens, whose K/V
  are already in the cache; query token ``i`` of sequence ``s`` sits at absolute position
  ``kv_lens[s] - q_len + i`` and sees keys ``0..position`` (causal).
* key position ``p`` of sequence ``s`` lives at page ``page_indices[s, p // page_size]``,
  offset ``p % page_size`` of ``k_cache`` / ``v_cache`` (``[num_pages, page_size,
  kv_heads, head_dim]``).
* GQA: query head ``h`` reads kv head ``h // (q_heads // kv_heads)``.
* scores are ``q . k * sm_scale`` (default ``head_dim ** -0.5``); with ``soft_cap`` they
  become ``soft_cap * tanh(score / soft_cap)``; with ``sliding_window = w`` a query at
  position ``p`` sees only keys ``k`` with ``p - w < k <= p`` (``w`` keys, itself included).

This module imports only NumPy, so it can be reused by any backend's tests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _f64(x) -> np.ndarray:
    """Any float array (NumPy, jax, bfloat16) as a float64 NumPy array."""
    a = np.asarray(x)
    if a.dtype.kind != "f":  # ml_dtypes.bfloat16 has kind 'V'
        a = a.astype(np.float32)
    return a.astype(np.float64)


def _ints(x) -> np.ndarray:
    return np.asarray(x).astype(np.int64)


def oracle_attention(
    q,
    k_cache,
    v_cache,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> np.ndarray:
    """Expected ragged paged attention output, float64 ``[num_tokens, q_heads, head_dim]``."""
    q = _f64(q)
    k_cache = _f64(k_cache)
    v_cache = _f64(v_cache)
    kv_lens = _ints(kv_lens)
    page_indices = _ints(page_indices)
    cu_q_lens = _ints(cu_q_lens)
    num_seqs = int(np.asarray(num_seqs).reshape(()))

    num_tokens, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)

    out = np.zeros((num_tokens, q_heads, head_dim), np.float64)
    for s in range(num_seqs):
        start, end = int(cu_q_lens[s]), int(cu_q_lens[s + 1])
        q_len = end - start
        kv_len = int(kv_lens[s])
        if q_len == 0:
            continue
        assert kv_len >= q_len, f"sequence {s}: kv_len {kv_len} < q_len {q_len}"

        # Gather this sequence's keys and values one position at a time.
        keys = np.empty((kv_len, kv_heads, head_dim), np.float64)
        values = np.empty((kv_len, kv_heads, head_dim), np.float64)
        for pos in range(kv_len):
            page = int(page_indices[s, pos // page_size])
            keys[pos] = k_cache[page, pos % page_size]
            values[pos] = v_cache[page, pos % page_size]

        key_pos = np.arange(kv_len)
        for i in range(q_len):
            t = start + i
            q_pos = kv_len - q_len + i
            visible = key_pos <= q_pos
            if sliding_window is not None:
                visible &= key_pos > q_pos - sliding_window
            for h in range(q_heads):
                kvh = h // group
                scores = keys[:, kvh, :] @ q[t, h] * sm_scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                scores = np.where(visible, scores, -np.inf)
                if not visible.any():
                    continue
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[t, h] = weights @ values[:, kvh, :]
    return out


@dataclasses.dataclass
class RaggedBatch:
    """One ragged attention problem; arrays are NumPy, ``args`` gives them in call order."""

    q: np.ndarray  # [num_tokens, q_heads, head_dim]
    k_cache: np.ndarray  # [num_pages, page_size, kv_heads, head_dim]
    v_cache: np.ndarray
    kv_lens: np.ndarray  # int32 [max_seqs]
    page_indices: np.ndarray  # int32 [max_seqs, pages_per_seq]
    cu_q_lens: np.ndarray  # int32 [max_seqs + 1]
    num_seqs: np.ndarray  # int32 scalar
    q_lens: np.ndarray  # int32 [max_seqs]
    slot_mapping: np.ndarray  # int32 [num_tokens]; this step's slots, padding -> out of range

    @property
    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.kv_lens, self.page_indices,
                self.cu_q_lens, self.num_seqs)

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[int(self.num_seqs)])


def pages_needed(kv_lens, page_size: int) -> int:
    return int(sum(-(-int(n) // page_size) for n in kv_lens))


def make_ragged_batch(
    rng: np.random.Generator,
    num_seqs: int,
    q_lens,
    kv_lens,
    page_size: int,
    num_pages: int,
    kv_heads: int,
    q_heads: int,
    head_dim: int,
    dtype,
    max_seqs: int | None = None,
    *,
    num_tokens: int | None = None,
    pages_per_seq: int | None = None,
) -> RaggedBatch:
    """A random ragged batch: queries, a random cache and a shuffled page table.

    Sequence ``s < num_seqs`` has ``q_lens[s]`` query tokens and ``kv_lens[s]`` context
    (``kv_lens[s] >= q_lens[s]``; ``q_lens[s] == 0`` is allowed). Rows ``num_seqs ..
    max_seqs - 1`` are padding sequences (q_len 0, kv_len 0). The flat token axis holds
    ``sum(q_lens)`` real tokens followed by padding up to ``num_tokens`` (default: no
    padding). Every sequence gets distinct pages drawn from a shuffled pool; unused page
    table entries (past a sequence's context, and padding rows) hold random but valid page
    ids, so an implementation that reads past ``kv_len`` without masking gets wrong
    answers. The whole cache, unused pages included, is random. ``slot_mapping`` gives
    this step's tokens' slots (``page * page_size + offset``) and ``num_pages *
    page_size`` (out of range) for padding tokens.
    """
    q_lens = [int(n) for n in q_lens]
    kv_lens = [int(n) for n in kv_lens]
    if len(q_lens) != num_seqs or len(kv_lens) != num_seqs:
        raise ValueError("q_lens and kv_lens need one entry per sequence")
    if any(q < 0 or kv < q for q, kv in zip(q_lens, kv_lens, strict=True)):
        raise ValueError(f"need 0 <= q_len <= kv_len, got {q_lens=} {kv_lens=}")
    max_seqs = num_seqs if max_seqs is None else max_seqs
    if max_seqs < num_seqs or max_seqs < 1:
        raise ValueError(f"max_seqs {max_seqs} < num_seqs {num_seqs}")
    seq_pages = [-(-kv // page_size) for kv in kv_lens]
    if pages_per_seq is None:
        pages_per_seq = max([1, *seq_pages])
    if max(seq_pages, default=0) > pages_per_seq:
        raise ValueError(f"pages_per_seq {pages_per_seq} too small for {kv_lens=}")
    if sum(seq_pages) > num_pages:
        raise ValueError(f"num_pages {num_pages} < {sum(seq_pages)} pages needed")
    real_tokens = sum(q_lens)
    num_tokens = real_tokens if num_tokens is None else num_tokens
    if num_tokens < real_tokens:
        raise ValueError(f"num_tokens {num_tokens} < {real_tokens} real tokens")
    dtype = np.dtype(dtype)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

    q = randn(num_tokens, q_heads, head_dim)
    k_cache = randn(num_pages, page_size, kv_heads, head_dim)
    v_cache = randn(num_pages, page_size, kv_heads, head_dim)

    pool = rng.permutation(num_pages)
    page_indices = rng.integers(0, num_pages, size=(max_seqs, pages_per_seq))
    used = 0
    for s, n in enumerate(seq_pages):
        page_indices[s, :n] = pool[used:used + n]
        used += n
    page_indices = page_indices.astype(np.int32)

    q_lens_padded = np.zeros(max_seqs, np.int32)
    q_lens_padded[:num_seqs] = q_lens
    kv_lens_padded = np.zeros(max_seqs, np.int32)
    kv_lens_padded[:num_seqs] = kv_lens
    cu_q_lens = np.zeros(max_seqs + 1, np.int32)
    cu_q_lens[1:] = np.cumsum(q_lens_padded)

    slot_mapping = np.full(num_tokens, num_pages * page_size, np.int32)
    for s in range(num_seqs):
        for i in range(q_lens[s]):
            pos = kv_lens[s] - q_lens[s] + i
            slot = page_indices[s, pos // page_size] * page_size + pos % page_size
            slot_mapping[cu_q_lens[s] + i] = slot

    return RaggedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        kv_lens=kv_lens_padded,
        page_indices=page_indices,
        cu_q_lens=cu_q_lens,
        num_seqs=np.asarray(num_seqs, np.int32),
        q_lens=q_lens_padded,
        slot_mapping=slot_mapping,
    )
