"""One simulated experiment: a trace through one policy on one profile, summarized.

Shared by ``python -m fbjax.replay`` and the benchmark scripts, so every figure is
computed the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fbjax.metrics import (
    BenchmarkSummary,
    CapacityResult,
    PrefillDecodeShare,
    RequestMetrics,
    capacity_search,
    prefill_decode_share,
    summarize,
)
from fbjax.profiling.store import Profile
from fbjax.sim.instance import PolicySpec, build_scheduler, unloaded_prefill_s
from fbjax.sim.simulator import SimRequest, SimResult, Simulator
from fbjax.traces import Trace


@dataclasses.dataclass(frozen=True)
class SLO:
    """TTFT and TPOT SLOs. With ``ttft_prefill_multiple`` set, a request's TTFT SLO is
    the larger of ``ttft_s`` and that multiple of its own unloaded prefill time, so a
    126K-token prompt is not judged by the bound of a 1K one (traces such as Mooncake
    mix both; with one fixed bound the longest prompts are infeasible even alone)."""

    ttft_s: float
    tpot_s: float
    ttft_prefill_multiple: float | None = None
    tbt_s: float | None = None  # P99 of each request's inter-token gaps (token stalls)

    def describe(self) -> str:
        ttft = f"TTFT <= {self.ttft_s * 1e3:.0f} ms"
        if self.ttft_prefill_multiple:
            ttft = (f"TTFT <= max({self.ttft_s * 1e3:.0f} ms, "
                    f"{self.ttft_prefill_multiple:g} x own unloaded prefill)")
        tbt = f", P99 TBT <= {self.tbt_s * 1e3:.0f} ms" if self.tbt_s is not None else ""
        return f"{ttft}, TPOT <= {self.tpot_s * 1e3:.0f} ms{tbt}"

    def ttft_for(self, prompt_len: int, profile: Profile) -> float:
        if not self.ttft_prefill_multiple:
            return self.ttft_s
        own = unloaded_prefill_s(profile.latency, profile.buckets, prompt_len, padded=False)
        return max(self.ttft_s, self.ttft_prefill_multiple * own)


@dataclasses.dataclass
class Outcome:
    """What one simulated run produced."""

    policy: str
    rate_scale: float
    summary: BenchmarkSummary
    records: list[RequestMetrics]
    share: PrefillDecodeShare
    result: SimResult
    num_skipped: int  # requests that could never fit the instance's KV pool
    prefix_cache_hit_rate: float | None = None  # with prefix caching: tokens found / looked up


def sim_requests(trace: Trace, slo: SLO, profile: Profile) -> tuple[list[SimRequest], int]:
    """The trace as simulator requests, each with its SLOs; those larger than the whole
    KV pool are dropped (and counted): no instance of this size could ever serve them."""
    out, skipped = [], 0
    for r in trace:
        output = max(1, r.output_len)
        if r.prompt_len + output > profile.kv_capacity_tokens:
            skipped += 1
            continue
        out.append(SimRequest(r.arrival_s, r.prompt_len, output,
                              slo.ttft_for(r.prompt_len, profile), slo.tpot_s,
                              r.hash_ids, trace.hash_block_size))
    return out, skipped


def simulate(trace: Trace, spec: PolicySpec, profile: Profile, slo: SLO, *,
             rate_scale: float = 1.0, noise: float = 0.0, seed: int = 0,
             envelope_anchor: str = "first_token",
             on_progress: Callable[[int, int], None] | None = None,
             step_overhead_s: float | None = None) -> Outcome:
    """``trace`` x ``rate_scale`` through ``spec`` on ``profile``; every step also
    costs ``step_overhead_s`` of host work (default: the profile's own figure)."""
    scheduler = build_scheduler(spec, profile)
    requests, skipped = sim_requests(trace.scaled(rate_scale), slo, profile)
    overhead = profile.step_overhead_s if step_overhead_s is None else step_overhead_s
    result = Simulator(scheduler, profile.latency, noise=noise, seed=seed,
                       on_progress=on_progress, step_overhead_s=overhead).run(requests)
    records = [RequestMetrics.from_request(r) for r in result.requests]
    first = min((r.arrival_time for r in result.requests), default=0.0)
    # Records carry each request's own SLOs, which override these defaults.
    summary = summarize(records, max(result.end_time - first, 1e-9), ttft_slo=slo.ttft_s,
                        tpot_slo=slo.tpot_s, envelope_anchor=envelope_anchor,
                        tbt_slo=slo.tbt_s)
    share = prefill_decode_share(
        (s.duration, s.prefill_tokens, s.decode_tokens, s.waiting_prefill, s.waiting_decode)
        for s in result.steps)
    hit_rate = scheduler.prefix_cache_hit_rate() if spec.prefix_caching else None
    return Outcome(spec.name, rate_scale, summary, records, share, result, skipped, hit_rate)


def capacity(trace: Trace, spec: PolicySpec, profile: Profile, slo: SLO, *,
             target: float = 0.99, noise: float = 0.0, seed: int = 0, tol: float = 0.02,
             lo: float = 0.25, hi: float = 2.0,
             on_point: Callable[[float, float], None] | None = None) -> CapacityResult:
    """Highest rate scale of ``trace`` at which SLO attainment stays >= ``target``."""

    def attainment(scale: float) -> float:
        outcome = simulate(trace, spec, profile, slo, rate_scale=scale, noise=noise, seed=seed)
        value = outcome.summary.slo_attainment or 0.0
        if on_point is not None:
            on_point(scale, value)
        return value

    return capacity_search(attainment, target=target, lo=lo, hi=hi, tol=tol)
