"""Schedulers with a prefix cache see only the prefill a cache hit leaves: FairBatching's
time budget, Sarathi's token budget and the load estimate all count the remaining
tokens; a request that is not admitted after all gives its cached pages back."""

from __future__ import annotations

import pytest

from fbjax.sched.fairbatching import FairBatchingScheduler
from fbjax.sched.kv_cache import KVCacheManager, token_page_keys
from fbjax.sched.request import Request, RequestStatus, SamplingParams
from fbjax.sched.sarathi import SarathiScheduler
from tests.sched.helpers import make_policy
from tests.sched.test_fairbatching_scheduler import NOW, make_fb, put_decode

PAGE = 16
SHARED = list(range(1000, 1080))  # 80 tokens: 5 full pages


def publish(kv: KVCacheManager, tokens: list[int]) -> None:
    """What an earlier, finished request leaves behind: its full pages, cached."""
    keys = token_page_keys(tokens, kv.page_size)
    assert kv.ensure("earlier", len(tokens))
    kv.register_pages("earlier", keys, len(tokens))
    kv.free("earlier")


def prompt(n_tail: int, seed: int = 0) -> list[int]:
    return SHARED + [seed * 100 + i for i in range(n_tail)]


def waiting(sched, rid: str, tokens: list[int], arrival: float = NOW - 0.01) -> Request:
    r = Request(rid, tokens, SamplingParams(max_tokens=8, ignore_eos=True), arrival)
    sched.add_request(r)
    return r


def fb_with_cache(num_pages: int = 1024) -> FairBatchingScheduler:
    sched = make_fb(num_pages=num_pages, page_size=PAGE)
    sched.kv = KVCacheManager(num_pages, PAGE, enable_prefix_caching=True)
    return sched


def test_fairbatching_budget_sees_the_prefill_left_after_a_hit():
    """Budget 0.1 s with one decode (5 ms): 84 prefill tokens fit, 80 after alignment.
    Uncached, the 100-token prompt gets an 80-token chunk; with its first 80 tokens
    cached, its 20 remaining tokens fit whole and it samples its first token now."""
    for cached in (False, True):
        sched = fb_with_cache()
        put_decode(sched, "d", [NOW - 0.05])  # due NOW + 0.05: budget max(0.05, 0.1)
        if cached:
            publish(sched.kv, SHARED)
        r = waiting(sched, "p", prompt(20))
        queried, hit = sched.prefix_query_tokens, sched.prefix_hit_tokens  # the decode's
        plan = sched.schedule(NOW)
        chunk = next(c for c in plan.chunks if c.request is r)
        if cached:
            assert (chunk.start, chunk.num_tokens, chunk.completes) == (80, 20, True)
            cached_pages = [sched.kv._page_of[k] for k in token_page_keys(SHARED, PAGE)]
            assert sched.kv.block_table("p")[:5] == cached_pages
            assert r.num_cached_tokens == 80
            assert (sched.prefix_query_tokens - queried, sched.prefix_hit_tokens - hit) == \
                (100, 80)
        else:
            assert (chunk.start, chunk.num_tokens, chunk.completes) == (0, 80, False)
            assert r.num_cached_tokens == 0


def test_load_estimate_counts_queued_prompts_less_their_cached_prefix():
    sched = fb_with_cache()
    waiting(sched, "p", prompt(20))
    cold = sched.load_estimate(NOW)["queued_prefill_tokens"]
    publish(sched.kv, SHARED)
    warm = sched.load_estimate(NOW)["queued_prefill_tokens"]
    assert (cold, warm) == (100, 20)
    assert sched.kv.num_free_pages == sched.kv.num_pages  # a look takes nothing


@pytest.mark.parametrize("policy", ["sarathi", "fairbatching"])
def test_request_not_admitted_gives_its_cached_pages_back(policy):
    """8 pages: 5 cached, 3 held by a running decode. The 100-token prompt needs 7 pages:
    its 5 cached ones plus 2 that nobody can give, so it stays waiting, holding none."""
    if policy == "sarathi":
        sched = make_policy(SarathiScheduler, num_pages=8, page_size=PAGE,
                            token_buckets=(128,), seq_buckets=(4,))
        sched.kv = KVCacheManager(8, PAGE, enable_prefix_caching=True)
    else:
        sched = fb_with_cache(num_pages=8)
    publish(sched.kv, SHARED)
    d = Request("d", list(range(40)), SamplingParams(max_tokens=8, ignore_eos=True), 0.0)
    sched.add_request(d)
    d.append_output(7, NOW - 0.05)
    d.num_computed_tokens = 40
    assert sched.kv.ensure("d", 41)
    sched.admit(d, 0.0)
    r = waiting(sched, "p", prompt(20))
    queried = sched.prefix_query_tokens
    plan = sched.schedule(NOW)
    assert [c.request.request_id for c in plan.chunks] == ["d"]
    assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0
    assert sched.kv.block_table("p") == []
    sched.kv.check_invariants()
    assert sched.kv.num_cached_pages == 5 and sched.kv.num_free_pages == 5
    assert sched.prefix_query_tokens == queried  # nothing was admitted


def test_sarathi_chunk_starts_after_the_hit_and_pages_publish_as_they_fill():
    sched = make_policy(SarathiScheduler, num_pages=64, page_size=PAGE,
                        token_buckets=(16, 32, 64), seq_buckets=(4,))
    sched.kv = KVCacheManager(64, PAGE, enable_prefix_caching=True)
    publish(sched.kv, SHARED[:48])  # 3 pages
    waiting(sched, "p", prompt(40))
    plan = sched.schedule(NOW)
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(48, 64)]
    sched.on_step_done(plan, {}, NOW)
    # 112 computed: pages 4..7 are full now and published under the prompt's keys.
    keys = token_page_keys(prompt(40), PAGE)
    assert sched.kv.cached_prefix_tokens(keys, 10**6) == 112
