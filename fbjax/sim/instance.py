"""Build a simulated serving instance from a profile: buckets, KV pool, scheduler.

A profile (:mod:`fbjax.profiling.store`) is a LatencyModel whose metadata
also names its bucket ladders and the KV capacity of the device it describes, so a
simulated instance has the same step shapes and memory as the real one would.
"""

from __future__ import annotations

import bisect
import dataclasses

from fbjax.config import BucketConfig
from fbjax.profiling.store import Profile
from fbjax.sched.base import Scheduler, StepLimits
from fbjax.sched.fairbatching import FairBatchingConfig
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.latency import LatencyModel, StepFeatures
from fbjax.sched.registry import make_scheduler
from fbjax.sched.sarathi import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_SEQS


def unloaded_prefill_s(latency: LatencyModel, buckets: BucketConfig, prompt_len: int,
                       chunk: int | None = None, *, padded: bool = True) -> float:
    """Time to prefill ``prompt_len`` tokens alone on an idle instance, in chunks of
    ``chunk`` tokens (default: the largest bucket). The protocol scales TTFT SLOs by
    it, ``padded=False`` (see ``unpadded_step_s``); the fastest chunking can be quicker
    (``fastest_unloaded_prefill_s``)."""
    chunk = chunk or buckets.max_tokens
    total, done = 0.0, 0
    while done < prompt_len:
        n = min(chunk, prompt_len - done)
        feats = StepFeatures.of_chunks([(n, done + n, False)])
        total += (latency.predict(buckets.pick(n, 1), feats) if padded
                  else unpadded_step_s(latency, buckets, feats))
        done += n
    return total


def unpadded_step_s(latency: LatencyModel, buckets: BucketConfig,
                    feats: StepFeatures) -> float:
    """A step's predicted time as if a bucket of exactly its token count existed: the
    predictions of the buckets either side, interpolated by token count. An SLO scaled
    from it moves smoothly with the prompt (padded, a 1,032-token prompt's SLO jumps 40%
    above a 1,012-token one's: the next bucket is 1,536), while a real step still pays
    its padding, which is the scheduler's cost to bear, not the SLO's."""
    n, ladder = feats.num_tokens, buckets.token_buckets
    padded = buckets.pick(n, feats.num_seqs)
    above = latency.predict(padded, feats)
    i = bisect.bisect_left(ladder, padded[0])
    if padded[0] == n or i == 0 or ladder[i - 1] < padded[1]:
        return above  # no padding, or no smaller bucket holds these sequences
    lo, hi = ladder[i - 1], padded[0]
    below = latency.predict((lo, padded[1]), feats)
    return below + (above - below) * (n - lo) / (hi - lo)


def fastest_unloaded_prefill_s(latency: LatencyModel, buckets: BucketConfig,
                               prompt_len: int) -> float:
    """The quickest prefill of ``prompt_len`` tokens alone over equal-chunk plans, one
    per token bucket: a padded largest bucket can cost more than several smaller steps
    (a 4,100-token prompt on the A100 profile: 500 ms in one 6,144-token step, 342 ms
    in 512-token chunks). What a request's TTFT can approach on an idle instance."""
    return min(unloaded_prefill_s(latency, buckets, prompt_len, chunk)
               for chunk in buckets.token_buckets)


def unloaded_decode_s(latency: LatencyModel, buckets: BucketConfig, context: int) -> float:
    """One decode step of a single request at ``context`` on an idle instance."""
    feats = StepFeatures.of_chunks([(1, context, True)])
    return latency.predict(buckets.pick(1, 1), feats)


def worst_case_step_time(latency: LatencyModel, buckets: BucketConfig, tokens: int,
                         max_seqs: int, context: int) -> float:
    """Predicted time of the heaviest step a fixed ``tokens`` budget admits: half its
    sequence slots as decodes at ``context``, the rest of the tokens one prompt chunk
    after a ``context``-long prefix (Sarathi must budget for this, not the average)."""
    decodes = min(max_seqs - 1, tokens // 2)
    feats = StepFeatures()
    for _ in range(decodes):
        feats.add(1, context, True)
    if tokens - decodes > 0:
        feats.add(tokens - decodes, context + tokens - decodes, False)
    return latency.predict(buckets.pick(feats.num_tokens, feats.num_seqs), feats)


def deployed_chunk_size(latency: LatencyModel, buckets: BucketConfig, tpot_slo_s: float,
                        context: int, max_seqs: int = DEFAULT_MAX_SEQS) -> int:
    """Sarathi "as deployed": the largest token bucket whose worst-case step time still
    meets the TPOT SLO (the smallest bucket if none does)."""
    best = buckets.token_buckets[0]
    for tokens in buckets.token_buckets:
        seqs = min(max_seqs, buckets.max_seqs)
        if worst_case_step_time(latency, buckets, tokens, seqs, context) <= tpot_slo_s:
            best = tokens
    return best


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A policy and its knobs, as a benchmark row names it."""

    policy: str  # vllm | sarathi | sarathi-edf | fairbatching
    token_budget: int | None = None  # vllm / sarathi chunk size
    max_seqs: int | None = None
    fairbatching: FairBatchingConfig | None = None
    ttft_slo_s: float | None = None  # sarathi-edf: deadline of requests without their own
    label: str | None = None
    prefix_caching: bool = False  # the instance reuses cached prompt prefixes

    @property
    def name(self) -> str:
        name = self.label or (f"{self.policy}-{self.token_budget}" if self.token_budget
                              else self.policy)
        return f"{name}+prefix-cache" if self.prefix_caching else name


def build_scheduler(spec: PolicySpec, profile: Profile,
                    kv_capacity_tokens: int | None = None) -> Scheduler:
    """A fresh scheduler with its own KV pool, as one instance would have."""
    capacity = kv_capacity_tokens or profile.kv_capacity_tokens
    kv = KVCacheManager(max(1, capacity // profile.page_size), profile.page_size,
                        spec.prefix_caching)
    if spec.policy in ("sarathi", "sarathi-edf"):
        budget = spec.token_budget or DEFAULT_CHUNK_SIZE
        limits = StepLimits.from_buckets(profile.buckets, budget,
                                         spec.max_seqs or DEFAULT_MAX_SEQS)
    else:
        limits = StepLimits.from_buckets(profile.buckets, spec.token_budget, spec.max_seqs)
    return make_scheduler(spec.policy, limits, kv, latency=profile.latency,
                          fairbatching=spec.fairbatching, ttft_slo_s=spec.ttft_slo_s)
