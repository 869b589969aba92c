"""The discrete-event simulator with every policy: completion (also with a KV pool tight
enough to preempt), token counts and timestamps, determinism, event order at a step
boundary, an exact hand-checked run, and a stalled scheduler."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fbjax.config import BucketConfig
from fbjax.sched.base import Scheduler, StepLimits, StepPlan
from fbjax.sched.fairbatching import FairBatchingConfig
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.latency import LatencyModel
from fbjax.sched.registry import POLICIES, make_scheduler
from fbjax.sched.request import RequestStatus
from fbjax.sim.simulator import SimRequest, SimulationStalled, Simulator

BUCKETS = BucketConfig(token_buckets=(16, 32, 64), seq_buckets=(4, 8))
PAGE = 16
# Relaxed SLOs so FairBatching's budget is not what the tests below are about.
FB_CONFIG = FairBatchingConfig(ttft_slo_s=10.0, tpot_slo_s=1.0, step_tokens=10**9)


def model(intercepts: dict[int, float] | None = None, per_prefill: float = 0.0,
          per_decode: float = 0.0) -> LatencyModel:
    """Step time = intercept of the token bucket + linear terms. Dyadic numbers keep sums
    of step times exact in floating point."""
    intercepts = intercepts or {16: 0.125, 32: 0.25, 64: 0.5}
    return LatencyModel({(t, s): np.array([intercepts[t], per_prefill, per_decode, 0, 0, 0])
                         for t, s in BUCKETS.pairs()})


LINEAR = model({16: 0.004, 32: 0.005, 64: 0.006}, per_prefill=2e-4, per_decode=1e-3)


def make(policy: str, *, num_pages: int = 4096, max_tokens: int | None = None,
         latency: LatencyModel = LINEAR) -> Scheduler:
    limits = StepLimits.from_buckets(BUCKETS, max_tokens)
    return make_scheduler(policy, limits, KVCacheManager(num_pages, PAGE), latency=latency,
                          fairbatching=FB_CONFIG)


def trace(seed: int, n: int = 30) -> list[SimRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(20.0)
        out.append(SimRequest(round(t, 4), rng.randint(1, 100), rng.randint(1, 30)))
    return out


# ----- every request finishes ----------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pool", ["ample", "tight"])
def test_every_request_finishes_with_exactly_its_tokens(policy, pool):
    arrivals = trace(1)
    biggest = max(-(-(r.prompt_len + r.output_len) // PAGE) for r in arrivals)
    num_pages = biggest + 1 if pool == "tight" else 4096
    sched = make(policy, num_pages=num_pages)
    progress = []
    result = Simulator(sched, LINEAR, on_progress=lambda done, total: progress.append(
        (done, total))).run(arrivals)

    by_arrival = sorted(arrivals, key=lambda r: r.arrival_s)
    assert [r.arrival_time for r in result.requests] == [r.arrival_s for r in by_arrival]
    for req, spec in zip(result.requests, by_arrival, strict=True):
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert req.num_output_tokens == spec.output_len == len(req.token_times)
        assert req.token_times == sorted(req.token_times)
        assert req.token_times[0] > req.arrival_time
        assert req.finish_time == req.token_times[-1]
    assert result.end_time == max(r.token_times[-1] for r in result.requests)
    assert not sched.has_unfinished() and sched.kv.num_free_pages == num_pages
    sched.kv.check_invariants()
    assert progress[-1] == (len(arrivals), len(arrivals))
    # steps are back to back or separated by idle time, never overlapping
    for a, b in zip(result.steps, result.steps[1:], strict=False):
        assert b.start >= a.start + a.duration - 1e-12
    assert all(s.duration > 0 for s in result.steps)
    preemptions = sum(s.num_preempted for s in result.steps)
    assert preemptions == sched.num_preemptions
    if pool == "tight":
        assert preemptions > 0, "the tight pool should force preemptions"
    else:
        assert preemptions == 0


# ----- determinism ---------------------------------------------------------------------------

def run_times(policy: str, *, noise: float, seed: int) -> list[list[float]]:
    result = Simulator(make(policy), LINEAR, noise=noise, seed=seed).run(trace(2))
    return [r.token_times for r in result.requests]


@pytest.mark.parametrize("policy", POLICIES)
def test_identical_seeds_identical_timestamps(policy):
    assert run_times(policy, noise=0.1, seed=5) == run_times(policy, noise=0.1, seed=5)
    assert run_times(policy, noise=0.1, seed=5) != run_times(policy, noise=0.1, seed=6)
    # without noise the seed does not matter
    assert run_times(policy, noise=0.0, seed=5) == run_times(policy, noise=0.0, seed=6)


def test_negative_noise_rejected():
    with pytest.raises(ValueError, match="noise"):
        Simulator(make("vllm"), LINEAR, noise=-0.1)


def test_bad_request_lengths_rejected():
    with pytest.raises(ValueError, match="output_len"):
        Simulator(make("vllm"), LINEAR).run([SimRequest(0.0, 10, 0)])


def test_slos_reach_the_requests_and_ties_keep_input_order():
    arrivals = [SimRequest(1.0, 5, 2, ttft_slo=0.5), SimRequest(0.0, 5, 2),
                SimRequest(1.0, 5, 2, tpot_slo=0.05)]
    result = Simulator(make("fairbatching"), LINEAR).run(arrivals)
    assert [r.request_id for r in result.requests] == ["sim-1", "sim-0", "sim-2"]
    assert [(r.ttft_slo, r.tpot_slo) for r in result.requests] == [
        (None, None), (0.5, None), (None, 0.05)]


# ----- event order at a step boundary --------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_arrival_at_a_step_boundary_joins_that_step(policy):
    flat = model({16: 0.25, 32: 0.25, 64: 0.25})  # every step takes 0.25 s
    arrivals = [SimRequest(0.0, 10, 3), SimRequest(0.25, 6, 1), SimRequest(0.3, 4, 1)]
    result = Simulator(make(policy, latency=flat), flat).run(arrivals)
    a, b, c = result.requests
    assert [s.start for s in result.steps] == [0.0, 0.25, 0.5]
    # b arrives exactly when step 1 starts: queued before that step is formed
    assert b.first_scheduled_time == 0.25 and b.token_times == [0.5]
    assert result.steps[1].prefill_tokens == 6 and result.steps[1].decode_tokens == 1
    # c arrives mid-step: it waits for the next boundary
    assert c.first_scheduled_time == 0.5 and c.token_times == [0.75]
    assert a.token_times == [0.25, 0.5, 0.75]


# ----- a run checked by hand -----------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_single_request_exact_ttft_and_e2e(policy):
    exact = model()  # bucket 16: 0.125 s, bucket 32: 0.25 s
    sched = make(policy, max_tokens=32, latency=exact)
    result = Simulator(sched, exact).run([SimRequest(1.0, 40, 3)])
    (r,) = result.requests
    # idle until 1.0; prompt chunks 32 (bucket 32: 0.25 s) and 8 (bucket 16: 0.125 s);
    # then two decodes of 0.125 s each
    assert [(s.start, s.duration, s.bucket) for s in result.steps] == [
        (1.0, 0.25, (32, 4)), (1.25, 0.125, (16, 4)), (1.375, 0.125, (16, 4)),
        (1.5, 0.125, (16, 4))]
    assert [(s.prefill_tokens, s.decode_tokens) for s in result.steps] == [
        (32, 0), (8, 0), (0, 1), (0, 1)]
    assert [(s.waiting_prefill, s.waiting_decode) for s in result.steps] == [
        (True, False), (True, False), (False, True), (False, True)]
    assert r.token_times == [1.375, 1.5, 1.625]
    assert r.token_times[0] - r.arrival_time == 0.375  # TTFT
    assert r.token_times[-1] - r.arrival_time == 0.625  # E2E
    assert result.end_time == 1.625 and r.first_scheduled_time == 1.0


# ----- a scheduler that makes no progress ----------------------------------------------------

class NeverSchedules(Scheduler):
    """Broken on purpose: always an empty plan."""

    def schedule(self, now: float) -> StepPlan:
        return self.make_plan([], [])


def test_empty_plan_with_nothing_to_wait_for_raises():
    sched = NeverSchedules(StepLimits.from_buckets(BUCKETS), KVCacheManager(64, PAGE))
    sim = Simulator(sched, LINEAR)
    with pytest.raises(SimulationStalled, match=r"t=1\.000s.*2 waiting"):
        sim.run([SimRequest(0.0, 5, 2), SimRequest(1.0, 5, 2)])  # waits for the 2nd arrival


def test_step_cap_raises():
    sim = Simulator(make("vllm", max_tokens=16), LINEAR, max_steps=3)
    with pytest.raises(SimulationStalled, match="3 steps"):
        sim.run([SimRequest(0.0, 100, 2)])


def test_unloaded_ttft_floor_bounds_every_policy_and_is_reached_alone():
    """The protocol's P99 TTFT floor (each request alone, in its fastest equal chunks) is
    what a lone request gets from Sarathi with that chunk size, and no policy's P99 TTFT
    on a loaded slice goes below it."""
    from fbjax.profiling.store import load_profile
    from fbjax.sim.experiment import SLO, simulate
    from fbjax.sim.instance import PolicySpec, unloaded_prefill_s
    from fbjax.sim.protocol import protocol_trace, unloaded_ttft_floor
    from fbjax.traces import Trace

    profile = load_profile("a100-llama3-8b")
    trace = protocol_trace("azure_llm_2023_conv", 60)
    slo = SLO(3.0, 0.1)
    longest = max(trace, key=lambda r: r.prompt_len)
    alone = Trace("one", [longest])
    floor_alone = unloaded_ttft_floor(profile, alone, 99.0)
    best = min(profile.buckets.token_buckets, key=lambda c: unloaded_prefill_s(
        profile.latency, profile.buckets, longest.prompt_len, c))
    assert floor_alone < unloaded_prefill_s(profile.latency, profile.buckets,
                                            longest.prompt_len)  # largest bucket: slower
    ttft = simulate(alone, PolicySpec("sarathi", token_budget=best), profile,
                    slo).records[0].ttft
    assert ttft == pytest.approx(floor_alone, rel=1e-9)
    floor = unloaded_ttft_floor(profile, trace)
    for spec in (PolicySpec("sarathi", token_budget=512), PolicySpec("fairbatching")):
        p99 = simulate(trace, spec, profile, slo, rate_scale=1.0).summary.ttft.p(99)
        assert p99 >= floor * 1e3


def test_step_overhead_adds_host_time_to_every_step():
    """``step_overhead_s`` (host work the profile does not time) lengthens every step
    by exactly that much, so a lone request's TTFT grows by it once per prefill step."""
    from fbjax.profiling.store import load_profile
    from fbjax.sim.experiment import SLO, simulate
    from fbjax.sim.instance import PolicySpec
    from fbjax.traces import Trace, TraceRequest

    profile = load_profile("a100-llama3-8b")
    trace = Trace("one", [TraceRequest(0.0, 1500, 4)])
    spec = PolicySpec("sarathi", token_budget=512)  # 3 prefill steps, then 3 decodes
    plain = simulate(trace, spec, profile, SLO(3.0, 0.1))
    slow = simulate(trace, spec, profile, SLO(3.0, 0.1), step_overhead_s=0.002)
    assert [s.duration for s in slow.result.steps] == pytest.approx(
        [s.duration + 0.002 for s in plain.result.steps])
    assert slow.records[0].ttft == pytest.approx(plain.records[0].ttft + 3 * 0.002)
    with pytest.raises(ValueError, match="step_overhead_s"):
        simulate(trace, spec, profile, SLO(3.0, 0.1), step_overhead_s=-1.0)


def test_profile_host_overhead_is_the_simulators_default(tmp_path):
    """A calibrated engine profile records its host work per step; load_profile reads
    it and simulate adds it unless told otherwise."""
    from fbjax.profiling.store import load_profile
    from fbjax.sim.experiment import SLO, simulate
    from fbjax.sim.instance import PolicySpec
    from fbjax.traces import Trace, TraceRequest

    base = load_profile("a100-llama3-8b")
    assert base.step_overhead_s == 0.0
    base.latency.metadata["host_overhead_s"] = 0.002
    base.latency.save(tmp_path / "calibrated.json")
    loaded = load_profile(tmp_path / "calibrated.json")
    assert loaded.step_overhead_s == 0.002
    trace = Trace("one", [TraceRequest(0.0, 1500, 4)])
    spec = PolicySpec("sarathi", token_budget=512)
    by_default = simulate(trace, spec, loaded, SLO(3.0, 0.1)).records[0].ttft
    explicit = simulate(trace, spec, base, SLO(3.0, 0.1), step_overhead_s=0.002).records[0].ttft
    assert by_default == pytest.approx(explicit)
    assert simulate(trace, spec, loaded, SLO(3.0, 0.1), step_overhead_s=0.0
                    ).records[0].ttft == pytest.approx(explicit - 3 * 0.002)


def test_ideal_capacity_by_hand_and_above_every_policy():
    """The idealized instance of ``ideal_capacity`` on a hand-made trace: five prompts
    of 1,000 tokens, 1 s apart, one TTFT SLO of 0.1 s. Each costs w = 1,000 x the best
    per-token time; queued back to back, the k-th (from 0) is done at (k + 1) w after
    the first arrival and due at k/s + 0.1, so all five are in time up to rate scale
    s = 4 / (5 w - 0.1). On a real slice it caps what the policies reach."""
    from fbjax.profiling.store import load_profile
    from fbjax.sched.latency import StepFeatures
    from fbjax.sim.experiment import SLO, capacity
    from fbjax.sim.protocol import ideal_capacity, policy_specs, protocol_trace, setting_for
    from fbjax.traces import Trace, TraceRequest

    profile = load_profile("a100-llama3-8b")
    per_token = min(profile.latency.predict(profile.buckets.pick(n, 1),
                                            StepFeatures.of_chunks([(n, n, False)])) / n
                    for n in profile.buckets.token_buckets)
    trace = Trace("five", [TraceRequest(float(k), 1000, 4) for k in range(5)])
    w = 1000 * per_token
    expected = 4 / (5 * w - 0.1)
    found = ideal_capacity(profile, trace, SLO(0.1, 1.0), target=1.0, tol=0.005)
    assert expected * 0.99 <= found <= expected

    trace = protocol_trace("azure_llm_2023_conv", 60)
    setting = setting_for("strict", profile, trace)
    ideal = ideal_capacity(profile, trace, setting.slo)
    for spec in policy_specs(setting, oracle=False, ablations=False):
        assert capacity(trace, spec, profile, setting.slo, tol=0.05, lo=0.05,
                        hi=1.0).rate_scale < ideal


def test_ideal_ttfts_in_each_order_by_hand():
    """Two prompts on the idealized instance: 3,000 tokens at 0 s, then 1,000 at 1 ms
    (w = 1,000 x the best per-token time). FCFS (and EDF, with one TTFT SLO) finishes
    the long one at 3w, the short at 4w; shortest-first lets the short one in at 1 ms."""
    from fbjax.profiling.store import load_profile
    from fbjax.sched.latency import StepFeatures
    from fbjax.sim.experiment import SLO
    from fbjax.sim.protocol import ideal_ttft_percentile, ideal_ttfts
    from fbjax.traces import Trace, TraceRequest

    profile = load_profile("a100-llama3-8b")
    w = 1000 * min(profile.latency.predict(profile.buckets.pick(n, 1),
                                           StepFeatures.of_chunks([(n, n, False)])) / n
                   for n in profile.buckets.token_buckets)
    trace = Trace("two", [TraceRequest(0.0, 3000, 4), TraceRequest(0.001, 1000, 4)])
    slo = SLO(10.0, 1.0)
    for order in ("fcfs", "deadline"):
        ttfts, slos = ideal_ttfts(profile, trace, slo, order=order)
        assert ttfts == pytest.approx([3 * w, 4 * w - 0.001]) and list(slos) == [10.0, 10.0]
    ttfts, _ = ideal_ttfts(profile, trace, slo, order="shortest")
    assert ttfts == pytest.approx([4 * w, w])
    # Twice the rate: the second arrives at 0.5 ms.
    ttfts, _ = ideal_ttfts(profile, trace, slo, rate_scale=2.0, order="fcfs")
    assert ttfts == pytest.approx([3 * w, 4 * w - 0.0005])
    worst, order = ideal_ttft_percentile(profile, trace, slo, 1.0, percentile=100)
    assert (worst, order) == (pytest.approx(4 * w - 0.001), "fcfs")
    with pytest.raises(ValueError, match="order"):
        ideal_ttfts(profile, trace, slo, order="random")
