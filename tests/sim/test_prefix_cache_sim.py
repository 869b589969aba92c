"""The simulator's prefix cache on the Mooncake conversation trace: page keys come from
the trace's block hashes (``hash_ids``, 512-token blocks), with the engine's allocator,
capacity and eviction rule. With an unbounded cache and requests far apart, the hit
rate equals the reuse computed directly from ``hash_ids`` (``traces.prefix_reuse``: a
pass over the trace, no allocator)."""

from __future__ import annotations

import dataclasses

import pytest

from fbjax.profiling.store import load_profile
from fbjax.sched.fairbatching import FairBatchingConfig
from fbjax.sched.kv_cache import BlockPageKeys
from fbjax.sim.experiment import SLO, simulate
from fbjax.sim.instance import PolicySpec
from fbjax.traces import Trace, load_trace, prefix_reuse

SLO_CONV = SLO(3.0, 0.1, ttft_prefill_multiple=5.0)


@pytest.fixture(scope="module")
def mooncake() -> Trace:
    return load_trace("mooncake_fast25_conversation")


@pytest.fixture(scope="module")
def profile():
    return load_profile("a100-llama3-8b")


def specs(prefix_caching: bool) -> list[PolicySpec]:
    return [PolicySpec("sarathi", token_budget=512, prefix_caching=prefix_caching),
            PolicySpec("fairbatching", fairbatching=FairBatchingConfig(
                ttft_slo_s=SLO_CONV.ttft_s, tpot_slo_s=SLO_CONV.tpot_s),
                prefix_caching=prefix_caching)]


def test_block_page_keys_follow_the_hash_blocks():
    keys = BlockPageKeys((7, 9, 4), 512, 16, 1100)  # 2 full blocks + 76 tokens
    assert len(keys) == 68  # full 16-token pages of 1100 tokens
    assert keys[0] == (0, 7, 0) and keys[31] == (0, 7, 31) and keys[32] == (1, 9, 0)
    assert keys[67] == (2, 4, 3) and keys[-1] == keys[67] and keys[1:3] == [keys[1], keys[2]]
    with pytest.raises(IndexError):
        keys[68]
    with pytest.raises(ValueError, match="multiple of the page size"):
        BlockPageKeys((1,), 500, 16, 100)


def test_unbounded_hit_rate_equals_the_reuse_in_hash_ids(mooncake, profile):
    spaced = Trace("spaced", [dataclasses.replace(r, arrival_s=1000.0 * i)
                              for i, r in enumerate(mooncake.requests[:300])])
    unbounded = dataclasses.replace(profile, kv_capacity_tokens=10**8)
    expected = prefix_reuse(spaced, profile.page_size)
    assert expected > 0.05  # the trace does repeat prefixes
    for spec in specs(True):
        outcome = simulate(spaced, spec, unbounded, SLO_CONV)
        assert outcome.prefix_cache_hit_rate == pytest.approx(expected, abs=1e-12), spec.name
    assert simulate(spaced, specs(False)[0], unbounded, SLO_CONV).prefix_cache_hit_rate is None


def test_caching_cuts_ttft_on_real_arrivals_with_the_real_pool(mooncake, profile):
    """Five minutes of the trace at a tenth of its rate (the whole rate is a cluster's,
    far beyond one A100) on the profile's KV pool (467K tokens, some 40 prompts):
    everything finishes, the cache supplies a share of the prompts (far less than an
    unbounded one: follow-up turns mostly come back after their pages were evicted),
    and TTFT is shorter."""
    window = mooncake.sliced(0, 300)
    unbounded = prefix_reuse(window, profile.page_size)
    for on, off in zip(specs(True), specs(False), strict=True):
        with_cache = simulate(window, on, profile, SLO_CONV, rate_scale=0.1)
        without = simulate(window, off, profile, SLO_CONV, rate_scale=0.1)
        assert len(with_cache.records) == len(without.records) == len(window)
        assert 0.02 < with_cache.prefix_cache_hit_rate < unbounded
        assert with_cache.summary.ttft.p(99) < without.summary.ttft.p(99), on.name
        assert with_cache.summary.ttft.p(50) < without.summary.ttft.p(50), on.name
