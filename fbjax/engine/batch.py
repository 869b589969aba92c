"""RaggedBatch: one step's inputs as flat host arrays, padded to a compiled bucket.

Built in numpy on the host (no JAX ops, so building a batch never compiles anything)
and handed to the bucket's executable, which transfers it in one go. The layout is
that of JAX's ragged paged attention: one token axis, ``cu_q_lens`` / ``kv_lens`` /
page table per sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from fbjax.model.llama import AttentionMetadata
from fbjax.sched.base import StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.request import MAX_LOGIT_BIAS, Request


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingInputs:
    """Per-sequence sampling controls, [S] each."""

    temperature: np.ndarray  # float32; 0 = greedy
    top_k: np.ndarray  # int32; <= 0 = off
    top_p: np.ndarray  # float32
    seeds: np.ndarray  # uint32
    output_index: np.ndarray  # int32: which output token this sample is (folds the key)
    num_logprobs: np.ndarray  # int32: alternatives to return per token; -1 = no logprobs
    min_p: np.ndarray  # float32; 0 = off
    presence_penalty: np.ndarray  # float32
    frequency_penalty: np.ndarray  # float32
    repetition_penalty: np.ndarray  # float32
    # int32: the row's slot in the penalty state (engine/penalties.py); -1: no penalties
    penalty_slot: np.ndarray
    bias_ids: np.ndarray  # [S, MAX_LOGIT_BIAS] int32: logit_bias tokens (padding: 0)
    bias_values: np.ndarray  # [S, MAX_LOGIT_BIAS] float32: their biases (padding: 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RaggedBatch:
    tokens: np.ndarray  # [T] int32
    attention: AttentionMetadata
    logits_indices: np.ndarray  # [S] int32: last token of each sequence
    sampling: SamplingInputs
    # [T] int32: for a prompt token of a request that asked for its prompt's
    # log-probabilities, the next prompt token (whose log-probability it gives); else -1
    prompt_targets: np.ndarray


def batch_shapes(num_tokens: int, num_seqs: int, pages_per_seq: int) -> RaggedBatch:
    """A batch of zeros with a bucket's shapes (used to lower the executable)."""
    i32 = np.int32
    return RaggedBatch(
        tokens=np.zeros(num_tokens, i32),
        attention=AttentionMetadata(
            positions=np.zeros(num_tokens, i32),
            slot_mapping=np.zeros(num_tokens, i32),
            kv_lens=np.zeros(num_seqs, i32),
            page_indices=np.zeros((num_seqs, pages_per_seq), i32),
            cu_q_lens=np.zeros(num_seqs + 1, i32),
            num_seqs=np.zeros((), i32),
        ),
        logits_indices=np.zeros(num_seqs, i32),
        prompt_targets=np.full(num_tokens, -1, i32),
        sampling=SamplingInputs(
            temperature=np.zeros(num_seqs, np.float32),
            top_k=np.zeros(num_seqs, i32),
            top_p=np.ones(num_seqs, np.float32),
            seeds=np.zeros(num_seqs, np.uint32),
            output_index=np.zeros(num_seqs, i32),
            num_logprobs=np.full(num_seqs, -1, i32),
            min_p=np.zeros(num_seqs, np.float32),
            presence_penalty=np.zeros(num_seqs, np.float32),
            frequency_penalty=np.zeros(num_seqs, np.float32),
            repetition_penalty=np.ones(num_seqs, np.float32),
            penalty_slot=np.full(num_seqs, -1, i32),
            bias_ids=np.zeros((num_seqs, MAX_LOGIT_BIAS), i32),
            bias_values=np.zeros((num_seqs, MAX_LOGIT_BIAS), np.float32),
        ),
    )


# The per-row scalars of SamplingInputs, in the order ``_sampling_row`` gives them.
_ROW_COLUMNS = ("temperature", "top_k", "top_p", "seeds", "output_index", "num_logprobs",
                "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "penalty_slot")


def _sampling_row(request: Request, penalty_slot: int) -> tuple:
    """One row of ``_ROW_COLUMNS``: the request's controls for the token it samples."""
    sp = request.sampling
    return (sp.temperature, sp.top_k, sp.top_p, 0 if sp.seed is None else sp.seed,
            request.num_output_tokens, -1 if sp.logprobs is None else sp.logprobs,
            sp.min_p, sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty,
            penalty_slot)


def build_batch(plan: StepPlan, kv: KVCacheManager, pages_per_seq: int,
                penalty_slots: Mapping[str, int] | None = None) -> RaggedBatch:
    """Fill a bucket-shaped batch from the plan's chunks and their page tables.

    Python touches each chunk once (its tokens, page table and sampling controls);
    positions and cache slots are computed for all tokens at once in numpy.

    Unseeded requests sample with seed 0 here; the engine gives each one a seed of its
    own when it is added, so this default only matters to direct callers.
    ``penalty_slots`` maps the requests whose sampled token is penalized in this step to
    their slots in the runner's penalty state (none: no row is penalized).
    """
    num_tokens, num_seqs = plan.bucket
    batch = batch_shapes(num_tokens, num_seqs, pages_per_seq)
    att, smp = batch.attention, batch.sampling
    page_size = kv.page_size
    att.slot_mapping[:] = kv.num_pages * page_size  # padding writes are dropped
    chunks = plan.chunks
    n = len(chunks)
    att.num_seqs[...] = n
    if not n:
        return batch
    penalty_slots = penalty_slots or {}
    tokens: list[int] = []
    starts, lens, rows = [], [], []
    for i, chunk in enumerate(chunks):
        request, count, start = chunk.request, chunk.num_tokens, chunk.start
        if count == 1:
            tokens.append(request.token_ids[start])
        else:
            tokens.extend(request.token_ids[start:start + count])
        starts.append(start)
        lens.append(count)
        table = kv.block_table(request.request_id)
        att.page_indices[i, :len(table)] = table
        sp = request.sampling
        rows.append(_sampling_row(request, penalty_slots.get(request.request_id, -1)))
        if sp.prompt_logprobs is not None and start + 1 < request.prompt_len:
            # Token p predicts token p + 1; only prompt tokens are targets.
            first = len(tokens) - count
            last = min(start + count, request.prompt_len - 1)  # targets start+1 .. last
            batch.prompt_targets[first:first + last - start] = \
                request.token_ids[start + 1:last + 1]
        if sp.logit_bias:
            ids, values = zip(*sp.logit_bias, strict=True)
            smp.bias_ids[i, :len(ids)] = ids
            smp.bias_values[i, :len(ids)] = values
    lens_arr = np.asarray(lens, np.int32)
    starts_arr = np.asarray(starts, np.int32)
    ends = np.cumsum(lens_arr, dtype=np.int32)
    total = int(ends[-1])
    seq_of_token = np.repeat(np.arange(n, dtype=np.int32), lens_arr)
    positions = np.arange(total, dtype=np.int32) + (starts_arr - (ends - lens_arr))[seq_of_token]
    batch.tokens[:total] = tokens
    att.positions[:total] = positions
    att.slot_mapping[:total] = (att.page_indices[seq_of_token, positions // page_size]
                                * page_size + positions % page_size)
    att.kv_lens[:n] = starts_arr + lens_arr
    att.cu_q_lens[1:n + 1] = ends
    att.cu_q_lens[n + 1:] = total
    batch.logits_indices[:n] = ends - 1
    for name, column in zip(_ROW_COLUMNS, zip(*rows, strict=True), strict=True):
        getattr(smp, name)[:n] = column
    return batch
