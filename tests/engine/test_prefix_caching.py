"""Prefix caching on the real engine (built-in model, CPU, float32): greedy outputs with
the cache equal outputs without it, when prompts share prefixes one after another,
concurrently, across a follow-up turn that contains the previous answer, and after
cached pages were evicted; reference counts return to zero; no page is recycled while
a sequence holds it (the allocator's invariants, checked after every step of random
request streams)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fbjax.config import CacheConfig
from fbjax.engine.engine import LLMEngine
from fbjax.sched.request import SamplingParams
from tests.conftest import engine_config

PAGE = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32, 127) for _ in range(n)]


SYSTEM = [256] + tokens(0, 69)  # 70 tokens: 4 full pages shared by the prompts below


@pytest.fixture(scope="module")
def cached(builtin_model):
    return LLMEngine(engine_config(), loaded=builtin_model)


@pytest.fixture(scope="module")
def plain(builtin_model):
    config = engine_config(cache=CacheConfig(page_size=PAGE, num_pages=512,
                                             enable_prefix_caching=False))
    return LLMEngine(config, loaded=builtin_model)


@pytest.fixture(scope="module")
def small_pool(builtin_model):
    """24 pages (384 tokens): cached pages must be evicted, and requests preempted."""
    config = engine_config(cache=CacheConfig(page_size=PAGE, num_pages=24))
    return LLMEngine(config, loaded=builtin_model)


def run(engine: LLMEngine, prompts: list[list[int]], sampling=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, sampling)]


def assert_pool_idle(engine: LLMEngine) -> None:
    engine.kv.check_invariants()
    assert engine.kv.num_free_pages == engine.kv.num_pages  # every reference returned


def test_caching_is_on_by_default_and_off_by_config(cached, plain):
    assert cached.kv.enable_prefix_caching and not plain.kv.enable_prefix_caching


def test_shared_prefix_one_after_another_equals_no_cache(cached, plain):
    cached.reset_prefix_cache()
    prompts = [SYSTEM + tokens(i, 5 + 9 * i) for i in range(1, 5)]
    expected = run(plain, prompts)
    first = cached.generate([prompts[0]], GREEDY)[0]
    assert first.num_cached_tokens == 0 and first.token_ids == expected[0]
    for prompt, want in zip(prompts[1:], expected[1:], strict=True):
        out = cached.generate([prompt], GREEDY)[0]
        assert out.token_ids == want
        assert out.num_cached_tokens == 64  # SYSTEM's 4 full pages, not the 5th
    assert_pool_idle(cached)
    assert cached.kv.num_cached_pages >= 4


def test_concurrent_requests_share_pages_read_only(cached, plain):
    """B arrives while A still decodes: it takes A's published pages (refcount 2)."""
    cached.reset_prefix_cache()
    a, b = SYSTEM + tokens(11, 40), SYSTEM + tokens(12, 7)
    long_run = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want_a, want_b = run(plain, [a], long_run)[0], run(plain, [b])[0]
    id_a = cached.add_request(a, long_run)
    while cached.scheduler.requests[id_a].num_output_tokens < 2:
        cached.step()
    id_b = cached.add_request(b, GREEDY)
    shared = False
    while cached.has_unfinished_requests():
        cached.step()
        table_a, table_b = cached.kv.block_table(id_a), cached.kv.block_table(id_b)
        shared |= bool(table_a and table_b and table_a[:4] == table_b[:4])
        cached.kv.check_invariants()
    assert shared, "the second request never held the first one's pages"
    out_a, out_b = cached.pop_finished(id_a), cached.pop_finished(id_b)
    assert out_a.token_ids == want_a and out_b.token_ids == want_b
    assert out_b.num_cached_tokens == 64
    assert_pool_idle(cached)


def test_follow_up_turn_reuses_the_previous_answer(cached, plain):
    cached.reset_prefix_cache()
    turn1 = SYSTEM + tokens(21, 30)
    answer = run(cached, [turn1], SamplingParams(max_tokens=40, temperature=0.0,
                                                  ignore_eos=True))[0]
    turn2 = turn1 + answer + tokens(22, 9)
    out = cached.generate([turn2], GREEDY)[0]
    assert out.token_ids == run(plain, [turn2])[0]
    # Pages filled while decoding the answer were published too, not just the prompt's.
    assert out.num_cached_tokens == (len(turn1) + len(answer) - 1) // PAGE * PAGE
    assert out.num_cached_tokens > len(turn1) // PAGE * PAGE
    assert_pool_idle(cached)


def test_outputs_equal_after_eviction_and_preemption(small_pool, plain):
    engine = small_pool
    engine.reset_prefix_cache()
    first = [SYSTEM + tokens(30 + i, 20) for i in range(2)]
    others = [tokens(40 + i, 150) for i in range(4)]  # unrelated: push SYSTEM's pages out
    want = run(plain, first + others + first)
    got = run(engine, first) + run(engine, others) + run(engine, first)
    assert got == want
    assert engine.kv.num_evictions > 0
    assert_pool_idle(engine)


# Random streams: prompts built from a few shared stems and random tails arrive at
# random steps, on the small pool (evictions, preemptions) and a roomy one.
stream = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 60), st.integers(1, 12), st.integers(0, 6)),
    min_size=1, max_size=8)
STEMS = [SYSTEM, SYSTEM[:40] + tokens(50, 30), tokens(51, 90)]


def replay(engine: LLMEngine, requests) -> list[list[int]]:
    """Add each request after its delay (in steps); step, checking invariants, to the end."""
    engine.reset_prefix_cache()
    pending = list(enumerate(requests))
    ids: dict[int, str] = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][3] <= steps:
            i, (stem, tail, max_tokens, _) = pending.pop(0)
            prompt = STEMS[stem] + tokens(1000 + i * 7 + tail, tail)
            ids[i] = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens,
                                                               temperature=0.0,
                                                               ignore_eos=True))
        if engine.has_unfinished_requests():
            engine.step()
            engine.kv.check_invariants()
        steps += 1
    assert_pool_idle(engine)
    return [engine.pop_finished(ids[i]).token_ids for i in range(len(requests))]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(requests=stream.map(lambda rs: sorted(rs, key=lambda r: r[3])))
def test_random_streams_equal_without_cache(cached, small_pool, plain, requests):
    want = replay(plain, requests)
    assert replay(cached, requests) == want
    assert replay(small_pool, requests) == want
