"""build_batch lays a plan out exactly as the attention kernels and the model expect."""

from __future__ import annotations

import numpy as np

from fbjax.engine.batch import build_batch
from fbjax.sched.base import ScheduledChunk, StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.request import Request, SamplingParams


def _request(rid: str, prompt_len: int, outputs: int, sampling: SamplingParams) -> Request:
    request = Request(rid, [256] + [40 + (i * 7 + len(rid)) % 80 for i in range(prompt_len - 1)],
                      sampling, 0.0)
    for i in range(outputs):
        request.append_output(100 + i, 0.0)
    return request


def test_mixed_plan_layout_matches_a_token_by_token_build():
    page_size, num_pages, pages_per_seq = 16, 64, 8
    kv = KVCacheManager(num_pages, page_size)
    kv.ensure("filler", 40)  # so the requests' pages are not simply 0, 1, 2, ...
    greedy = SamplingParams(max_tokens=50, temperature=0.0)
    hot = SamplingParams(max_tokens=50, temperature=0.7, top_k=5, top_p=0.9, seed=11)
    decode = _request("decode", 37, 3, hot)  # 40 known tokens, the last one new
    prompt = _request("prompt", 21, 0, greedy)  # a whole prompt
    chunk = _request("chunked", 70, 0, greedy)  # second chunk of a long prompt
    chunks = [ScheduledChunk(decode, 1, 39), ScheduledChunk(prompt, 21, 0),
              ScheduledChunk(chunk, 30, 32)]
    for c in chunks:
        assert kv.ensure(c.request.request_id, c.start + c.num_tokens)
    plan = StepPlan((64, 4), chunks)

    batch = build_batch(plan, kv, pages_per_seq)
    att, smp = batch.attention, batch.sampling

    tokens, positions, slots = [], [], []
    for c in chunks:
        table = kv.block_table(c.request.request_id)
        for pos in range(c.start, c.start + c.num_tokens):
            tokens.append(c.request.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
    n = len(tokens)
    assert batch.tokens.tolist() == tokens + [0] * (64 - n)
    assert att.positions.tolist() == positions + [0] * (64 - n)
    assert att.slot_mapping.tolist() == slots + [num_pages * page_size] * (64 - n)
    assert att.kv_lens.tolist() == [40, 21, 62, 0]
    assert att.cu_q_lens.tolist() == [0, 1, 22, 52, 52]
    assert int(att.num_seqs) == 3
    assert batch.logits_indices.tolist() == [0, 21, 51, 0]
    for i, c in enumerate(chunks):
        table = kv.block_table(c.request.request_id)
        assert att.page_indices[i, :len(table)].tolist() == table
        assert not att.page_indices[i, len(table):].any()
    assert not att.page_indices[3].any()
    np.testing.assert_array_equal(smp.temperature, np.float32([0.7, 0.0, 0.0, 0.0]))
    assert smp.top_k.tolist() == [5, 0, 0, 0]
    np.testing.assert_array_equal(smp.top_p, np.float32([0.9, 1.0, 1.0, 1.0]))
    assert smp.seeds.tolist() == [11, 0, 0, 0]
    assert smp.output_index.tolist() == [3, 0, 0, 0]
    for x in (batch.tokens, att.positions, att.slot_mapping, att.kv_lens, att.cu_q_lens,
              att.page_indices, batch.logits_indices, smp.top_k, smp.output_index):
        assert x.dtype == np.int32
    assert smp.seeds.dtype == np.uint32


def test_empty_plan_is_all_padding():
    kv = KVCacheManager(8, 16)
    batch = build_batch(StepPlan((4, 1), []), kv, 4)
    assert int(batch.attention.num_seqs) == 0
    assert batch.attention.slot_mapping.tolist() == [8 * 16] * 4
    assert not batch.attention.cu_q_lens.any()
