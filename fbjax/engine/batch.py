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

# The per-row scalars and their neutral values (padding rows hold them). They travel as
# one float32 and one int32 matrix, not an array each: every array of a batch is a
# host-to-device copy of its own (~6 us on CPU), which every step would pay.
FLOAT_COLUMNS = {
    "temperature": 0.0,  # 0 = greedy
    "top_p": 1.0,
    "min_p": 0.0,  # 0 = off
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
INT_COLUMNS = {
    "top_k": 0,  # <= 0 = off
    "output_index": 0,  # which output token this sample is (folds the key)
    "num_logprobs": -1,  # alternatives to return per token; -1 = no logprobs
    "penalty_slot": -1,  # the row's slot in the penalty state (engine/penalties.py)
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingInputs:
    """Per-sequence sampling controls; each name of FLOAT_COLUMNS and INT_COLUMNS reads
    its column, [S] (a view: writing it writes the matrix)."""

    floats: np.ndarray  # [S, len(FLOAT_COLUMNS)] float32
    ints: np.ndarray  # [S, len(INT_COLUMNS)] int32
    seeds: np.ndarray  # [S] uint32
    bias_ids: np.ndarray  # [S, MAX_LOGIT_BIAS] int32: logit_bias tokens (padding: 0)
    bias_values: np.ndarray  # [S, MAX_LOGIT_BIAS] float32: their biases (padding: 0)


def _add_column_views() -> None:
    """``SamplingInputs.temperature`` etc.: one property per packed column."""
    def view(matrix: str, index: int) -> property:
        return property(lambda self: getattr(self, matrix)[:, index])

    for matrix, columns in (("floats", FLOAT_COLUMNS), ("ints", INT_COLUMNS)):
        for index, name in enumerate(columns):
            setattr(SamplingInputs, name, view(matrix, index))


_add_column_views()


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
            floats=np.tile(np.float32(list(FLOAT_COLUMNS.values())), (num_seqs, 1)),
            ints=np.tile(np.int32(list(INT_COLUMNS.values())), (num_seqs, 1)),
            seeds=np.zeros(num_seqs, np.uint32),
            bias_ids=np.zeros((num_seqs, MAX_LOGIT_BIAS), i32),
            bias_values=np.zeros((num_seqs, MAX_LOGIT_BIAS), np.float32),
        ),
    )


def _sampling_row(request: Request, penalty_slot: int
                  ) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """The request's controls for the token it samples: its FLOAT_COLUMNS and
    INT_COLUMNS, in their order, and its seed."""
    sp = request.sampling
    floats = (sp.temperature, sp.top_p, sp.min_p, sp.presence_penalty, sp.frequency_penalty,
              sp.repetition_penalty)
    ints = (sp.top_k, request.num_output_tokens, -1 if sp.logprobs is None else sp.logprobs,
            penalty_slot)
    return floats, ints, 0 if sp.seed is None else sp.seed


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
    smp.floats[:n], smp.ints[:n], smp.seeds[:n] = zip(*rows, strict=True)
    return batch
