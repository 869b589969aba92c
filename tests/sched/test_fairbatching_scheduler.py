"""FairBatching on hand-built states with a hand-made latency model whose predictions are
easy to compute by hand (``a + b * prefill_tokens + c * decodes``, the same on every
bucket), plus properties over random states and a bounded-stall simulation.

Hand-computed numbers use the default model of this file: a = 0.0105 s, b = 1 ms per
prefill token, c = 5 ms per decode; SLOs TTFT 3 s and TPOT 0.1 s; chunk_align 16.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fbjax.config import BucketConfig
from fbjax.sched.base import StepLimits, StepPlan
from fbjax.sched.fairbatching import FairBatchingConfig, FairBatchingScheduler
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.latency import FEATURES, LatencyModel, StepFeatures
from fbjax.sched.registry import make_scheduler
from fbjax.sched.request import Request, RequestStatus, SamplingParams
from fbjax.sched.sarathi import SarathiScheduler
from fbjax.sim.simulator import SimRequest, Simulator, plan_features
from tests.sched.fb_reference import ReferenceFairBatching

OUT = 7
NOW = 10.0
BUCKETS = BucketConfig(token_buckets=(16, 32, 64, 128, 256, 512), seq_buckets=(4, 8, 16))
A, B_PREFILL, C_DECODE = 0.0105, 0.001, 0.005
DEFAULT_STALL_TPOTS = FairBatchingConfig().max_decode_stall_tpots


def linear_model(a: float = A, b: float = B_PREFILL, c: float = C_DECODE,
                 buckets: BucketConfig = BUCKETS) -> LatencyModel:
    coef = np.array([a, b, c, 0.0, 0.0, 0.0])
    return LatencyModel({p: coef for p in buckets.pairs()})


def make_fb(config: FairBatchingConfig | None = None, *, model: LatencyModel | None = None,
            num_pages: int = 1024, page_size: int = 16, max_tokens: int | None = None,
            max_seqs: int | None = None, buckets: BucketConfig = BUCKETS
            ) -> FairBatchingScheduler:
    limits = StepLimits.from_buckets(buckets, max_tokens, max_seqs)
    # The hand-computed plans below fill steps to the time budget: no knee cap unless a
    # test asks for one (the knee has tests of its own).
    config = config or FairBatchingConfig()
    if config.step_tokens is None:
        config = dataclasses.replace(config, step_tokens=10**9)
    # Nor the default stall cap: these states bank seconds of slack on purpose, to pin
    # the envelope itself (the cap has tests of its own).
    if config.max_decode_stall_tpots == DEFAULT_STALL_TPOTS:
        config = dataclasses.replace(config, max_decode_stall_tpots=None)
    return FairBatchingScheduler(limits, KVCacheManager(num_pages, page_size),
                                 model or linear_model(buckets=buckets), config)


def put_decode(sched, rid: str, token_times: list[float], *, prompt_len: int = 20,
               arrival: float | None = None, max_tokens: int = 100, ttft_slo=None,
               tpot_slo=None) -> Request:
    """A running request that has sampled ``len(token_times)`` tokens at those times and
    is ready to decode its next one."""
    arrival = token_times[0] - 0.5 if arrival is None else arrival
    r = Request(rid, [], SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival,
                prompt_len=prompt_len, ttft_slo=ttft_slo, tpot_slo=tpot_slo)
    sched.add_request(r)
    for t in token_times:
        r.append_output(OUT, t)
    r.num_computed_tokens = r.num_tokens - 1
    assert sched.kv.ensure(rid, r.num_computed_tokens)
    sched.admit(r, arrival)
    return r


def ahead_decode(sched, rid: str, first: float, k: int = 10, **kw) -> Request:
    """``k`` tokens from ``first`` on, 5 ms apart (ahead of a 0.1 s TPOT): the next one is
    due at ``first + k * 0.1`` under the first-token anchor."""
    return put_decode(sched, rid, [first + 0.005 * i for i in range(k)], **kw)


def put_waiting(sched, rid: str, prompt_len: int, arrival: float, max_tokens: int = 4,
                **kw) -> Request:
    r = Request(rid, [], SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival,
                prompt_len=prompt_len, **kw)
    sched.add_request(r)
    return r


def chunks_of(plan: StepPlan) -> list[tuple[str, int]]:
    return [(c.request.request_id, c.num_tokens) for c in plan.chunks]


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def step_time(sched, plan: StepPlan) -> float:
    return sched.latency.predict(plan.bucket, plan_features(plan)) if plan.chunks else 0.0


# ----- deadlines -----------------------------------------------------------------------------

def test_due_first_token_is_arrival_plus_ttft():
    sched = make_fb()
    r = put_waiting(sched, "w", 10, arrival=2.0)
    assert sched.due(r) == pytest.approx(5.0)
    own = put_waiting(sched, "own", 10, arrival=2.0, ttft_slo=0.5)
    assert sched.due(own) == pytest.approx(2.5)


def test_due_with_first_token_anchor():
    sched = make_fb()
    r = put_decode(sched, "d", [4.0, 4.01, 4.02], arrival=1.0)  # j = 3
    assert sched.due(r) == pytest.approx(4.0 + 3 * 0.1)
    own = put_decode(sched, "own", [4.0, 4.01], arrival=1.0, tpot_slo=0.05, ttft_slo=9.0)
    assert sched.due(own) == pytest.approx(4.0 + 2 * 0.05)


def test_due_with_arrival_anchor():
    sched = make_fb(FairBatchingConfig(anchor="arrival"))
    r = put_decode(sched, "d", [4.0, 4.01, 4.02], arrival=1.0)
    assert sched.due(r) == pytest.approx(1.0 + 3.0 + 3 * 0.1)
    own = put_decode(sched, "own", [4.0, 4.01], arrival=1.0, ttft_slo=2.0, tpot_slo=0.2)
    assert sched.due(own) == pytest.approx(1.0 + 2.0 + 2 * 0.2)


def test_max_decode_stall_caps_banked_slack():
    sched = make_fb(FairBatchingConfig(max_decode_stall_s=0.25))
    far = put_decode(sched, "far", [4.0 + 0.01 * i for i in range(20)])  # last at 4.19
    assert sched.due(far) == pytest.approx(4.19 + 0.25)  # not 4.0 + 20 * 0.1
    near = put_decode(sched, "near", [4.0, 4.2])
    assert sched.due(near) == pytest.approx(4.2)  # the envelope is tighter than the cap
    w = put_waiting(sched, "w", 5, arrival=1.0)
    assert sched.due(w) == pytest.approx(4.0)  # no cap before the first token


def test_default_caps_stalls_at_three_tpots():
    assert FairBatchingConfig().max_decode_stall_tpots == 3.0
    sched = FairBatchingScheduler(StepLimits.from_buckets(BUCKETS), KVCacheManager(1024, 16),
                                  linear_model())
    far = put_decode(sched, "far", [4.0 + 0.01 * i for i in range(20)])  # last at 4.19
    assert sched.due(far) == pytest.approx(4.19 + 3 * 0.1)


def test_max_decode_stall_in_tpots_uses_each_requests_own_tpot():
    sched = make_fb(FairBatchingConfig(max_decode_stall_tpots=2.0))
    far = put_decode(sched, "far", [4.0 + 0.01 * i for i in range(20)])  # last at 4.19
    assert sched.due(far) == pytest.approx(4.19 + 2 * 0.1)
    own = put_decode(sched, "own", [4.0 + 0.01 * i for i in range(20)], tpot_slo=0.05)
    assert sched.due(own) == pytest.approx(4.19 + 2 * 0.05)
    both = make_fb(FairBatchingConfig(max_decode_stall_tpots=2.0, max_decode_stall_s=0.15))
    r = put_decode(both, "r", [4.0 + 0.01 * i for i in range(20)])
    assert both.due(r) == pytest.approx(4.19 + 0.15)  # the tighter cap wins
    w = put_waiting(sched, "w", 5, arrival=1.0)
    assert sched.due(w) == pytest.approx(4.0)  # no cap before the first token


def test_config_validation():
    with pytest.raises(ValueError, match="anchor"):
        FairBatchingConfig(anchor="nope")
    with pytest.raises(ValueError):
        FairBatchingConfig(tpot_slo_s=0)
    with pytest.raises(ValueError):
        FairBatchingConfig(max_decode_stall_s=0)
    with pytest.raises(ValueError):
        FairBatchingConfig(max_decode_stall_tpots=-1.0)
    with pytest.raises(ValueError, match="fcfs_headroom"):
        FairBatchingConfig(fcfs_headroom=0.0)
    with pytest.raises(ValueError, match="latency model lacks buckets"):
        make_fb(model=LatencyModel({(16, 4): np.zeros(len(FEATURES))}))


def test_registry_needs_a_latency_model():
    limits = StepLimits.from_buckets(BUCKETS)
    kv = KVCacheManager(64, 16)
    with pytest.raises(ValueError, match="latency"):
        make_scheduler("fairbatching", limits, kv)
    sched = make_scheduler("fairbatching", limits, kv, latency=linear_model(),
                           fairbatching=FairBatchingConfig(anchor="arrival"))
    assert isinstance(sched, FairBatchingScheduler) and sched.config.anchor == "arrival"


# ----- the time budget -----------------------------------------------------------------------

def test_time_budget_is_max_of_min_slack_and_min_tpot():
    sched = make_fb()
    d1 = ahead_decode(sched, "d1", 9.5)  # due 10.5
    d2 = ahead_decode(sched, "d2", 9.3)  # due 10.3
    assert sched.time_budget([d1, d2], NOW) == pytest.approx(0.3)
    # slack below the TPOT: the budget never drops below one TPOT (here d3's own 0.05)
    d3 = put_decode(sched, "d3", [9.99], tpot_slo=0.05)  # due 10.04
    assert sched.time_budget([d1, d2, d3], NOW) == pytest.approx(0.05)
    late = put_decode(sched, "late", [9.0], tpot_slo=0.2)  # due 9.2: late already
    assert sched.time_budget([late], NOW) == pytest.approx(0.2)
    assert sched.time_budget([d1, late], NOW) == pytest.approx(0.1)  # min TPOT of the two


def test_time_budget_unbounded_without_decodes_judged_even_without_adaptive_capacity():
    sched = make_fb()
    assert sched.time_budget([], NOW) == math.inf
    # Without adaptive capacity the budget still decides urgency (it no longer bounds
    # the step's size), so the ablation isolates capacity from fair formation.
    fixed = make_fb(FairBatchingConfig(adaptive_capacity=False))
    d = ahead_decode(fixed, "d", 9.5)
    assert fixed.time_budget([d], NOW) == make_fb().time_budget([d], NOW) < math.inf


def test_no_decodes_fills_the_token_budget():
    sched = make_fb(max_tokens=100)
    for i in range(3):
        put_waiting(sched, f"w{i}", 40, arrival=9.0 + i)
    plan = sched.schedule(NOW)
    assert chunks_of(plan) == [("w0", 40), ("w1", 40), ("w2", 20)]  # token budget only
    assert step_time(sched, plan) == pytest.approx(A + 0.1)


# ----- decode burst with slack + prefill surge -----------------------------------------------

def burst_state(sched) -> None:
    """Four decodes ahead of their envelopes (slack 0.95, 0.8, 0.65, 0.5 s at NOW, listed
    in that running order) and three 300-token prompts that just arrived."""
    for rid, first in (("D4", 9.95), ("D3", 9.8), ("D2", 9.65), ("D1", 9.5)):
        ahead_decode(sched, rid, first)
    for i, rid in enumerate(("W1", "W2", "W3")):
        put_waiting(sched, rid, 300, arrival=9.9 + 0.01 * i)


def test_burst_prompts_get_the_step_relaxed_decodes_yield():
    sched = make_fb()
    burst_state(sched)
    slack = {r.request_id: sched.due(r) - NOW for r in sched.running}
    assert slack == pytest.approx({"D1": 0.5, "D2": 0.65, "D3": 0.8, "D4": 0.95})

    plan = sched.schedule(NOW)

    # budget = max(0.5, 0.1) = 0.5 s; urgent: slack < 0.5 + 1 * 0.1, so D1 only.
    # D1: 0.0105 + 0.005 = 0.0155.  W1 whole: + 0.300 = 0.3155.
    # W2: largest n with 0.3155 + 0.001 n <= 0.5 is 184, aligned down to 16 -> 176 (0.4915).
    # W3: largest n with 0.4915 + 0.001 n <= 0.5 is 8 (< 16: kept) -> 0.4995.
    # D2, D3, D4 (relaxed): 0.4995 + 0.005 > 0.5 -> skipped this step.
    assert chunks_of(plan) == [("D1", 1), ("W1", 300), ("W2", 176), ("W3", 8)]
    assert plan.bucket == (512, 4) and plan.preempted == []
    t = step_time(sched, plan)
    assert t == pytest.approx(0.4995)
    assert NOW + t <= sched.due(sched.requests["D1"])  # the tightest decode is on time
    for rid in ("D2", "D3", "D4"):  # the skipped ones keep at least a TPOT of slack
        assert sched.due(sched.requests[rid]) - (NOW + t) >= 0.1
    assert all(sched.requests[w].status is RequestStatus.RUNNING for w in ("W1", "W2", "W3"))


def test_sarathi_on_the_burst_runs_decodes_first_and_makes_one_late():
    sarathi = SarathiScheduler(StepLimits.from_buckets(BUCKETS, 512), KVCacheManager(1024, 16))
    burst_state(sarathi)
    plan = sarathi.schedule(NOW)
    # every decode first, in running order; then W1 whole and W2 to the 512-token budget
    assert chunks_of(plan) == [("D4", 1), ("D3", 1), ("D2", 1), ("D1", 1), ("W1", 300),
                               ("W2", 208)]
    t = linear_model().predict(plan.bucket, plan_features(plan))
    assert t == pytest.approx(A + 0.508 + 4 * C_DECODE)  # 0.5385 s
    fb = make_fb()  # the same envelope, computed by FairBatching's rule
    burst_state(fb)
    assert NOW + t > fb.due(fb.requests["D1"])  # D1's token (due at 10.5) comes late


def test_fair_formation_off_is_decode_first():
    sched = make_fb(FairBatchingConfig(fair_formation=False))
    burst_state(sched)
    plan = sched.schedule(NOW)
    # decodes by due (0.0305 s), W1 (0.3305), W2: n <= 169.5 -> 169 -> 160, W3: n <= 9.5 -> 9
    assert chunks_of(plan) == [("D1", 1), ("D2", 1), ("D3", 1), ("D4", 1), ("W1", 300),
                               ("W2", 160), ("W3", 9)]
    assert step_time(sched, plan) == pytest.approx(0.4995)


def test_adaptive_capacity_off_fills_the_token_budget():
    sched = make_fb(FairBatchingConfig(adaptive_capacity=False))
    burst_state(sched)
    plan = sched.schedule(NOW)
    # urgency as with adaptive capacity (only D1 is urgent), but the step is bounded by
    # the 512-token budget alone: prompts fill it, the relaxed decodes find no room.
    assert chunks_of(plan) == [("D1", 1), ("W1", 300), ("W2", 211)]


# ----- decode with no slack ------------------------------------------------------------------

def test_decode_without_slack_runs_first():
    sched = make_fb()
    ok = ahead_decode(sched, "ok", 9.3, k=10)  # due 10.3: slack 0.3
    late = put_decode(sched, "late", [9.78, 9.88], arrival=9.0)  # due 9.98: 20 ms late
    put_waiting(sched, "w", 300, arrival=9.95)
    assert ids(sched.running) == ["ok", "late"]
    plan = sched.schedule(NOW)
    # budget = max(-0.02, 0.1) = 0.1; urgent: slack < 0.2, so "late" only.
    # late 0.0155; w: n <= 84.5 -> 84 -> 80 (0.0955); ok: 0.1005 > 0.1 -> skipped.
    assert chunks_of(plan) == [("late", 1), ("w", 80)]
    assert ok.status is RequestStatus.RUNNING and late.status is RequestStatus.RUNNING


def test_host_overhead_per_step_comes_off_the_time_budget():
    model = linear_model()
    model.metadata["host_overhead_s"] = 0.05
    sched = make_fb(model=model)
    put_decode(sched, "late", [9.78, 9.88], arrival=9.0)  # due 9.98: budget 0.1
    put_waiting(sched, "w", 300, arrival=9.95)
    plan = sched.schedule(NOW)
    # The step may be predicted at 0.1 - 0.05 s: late 0.0155; w: n <= 34.5 -> 32.
    assert chunks_of(plan) == [("late", 1), ("w", 32)]
    assert step_time(sched, plan) + 0.05 <= 0.1
    # The load estimate pays it on every step too.
    plain = make_fb()
    put_decode(plain, "late", [9.78, 9.88], arrival=9.0)
    est, plain_est = sched.load_estimate(NOW), plain.load_estimate(NOW)
    assert est["prefill_tokens_per_s"] == pytest.approx(
        512 / (A + 512 * B_PREFILL + 0.05))
    assert est["decode_time_s"] == pytest.approx(
        plain_est["decode_time_s"] * (A + C_DECODE + 0.05) / (A + C_DECODE))


def test_urgent_decodes_run_even_when_they_alone_exceed_the_budget():
    sched = make_fb(model=linear_model(a=0.3))  # every step takes > 0.3 s, TPOT 0.1
    put_decode(sched, "u1", [9.95])  # due 10.05
    put_decode(sched, "u2", [9.96])  # due 10.06: within a margin of u1, urgent too
    ahead_decode(sched, "relaxed", 9.5)  # due 10.5
    put_waiting(sched, "w", 50, arrival=9.0)
    plan = sched.schedule(NOW)
    assert chunks_of(plan) == [("u1", 1), ("u2", 1)]  # nothing else fits; no prefill sliver


# ----- forward progress ----------------------------------------------------------------------

def test_impossible_slo_still_makes_progress():
    impossible = linear_model(a=1.0)  # the smallest step (1 s) exceeds every budget
    # only prompts: no decode bounds the step, so the token budget applies
    sched = make_fb(model=impossible, max_tokens=64)
    put_waiting(sched, "w", 100, arrival=9.0)
    assert chunks_of(sched.schedule(NOW)) == [("w", 64)]
    # decodes with slack and margin 0: nothing is urgent and nothing fits -> the most
    # urgent candidate runs alone, minimally
    sched = make_fb(FairBatchingConfig(urgency_margin=0.0), model=impossible)
    ahead_decode(sched, "d1", 9.5)
    ahead_decode(sched, "d2", 9.4)
    put_waiting(sched, "w", 100, arrival=9.0)  # due 12.0
    assert chunks_of(sched.schedule(NOW)) == [("d2", 1)]
    sched = make_fb(FairBatchingConfig(urgency_margin=0.0), model=impossible)
    ahead_decode(sched, "d1", 9.5)
    put_waiting(sched, "w", 100, arrival=7.3)  # due 10.3, before d1's 10.5
    plan = sched.schedule(NOW)
    assert chunks_of(plan) == [("w", 16)]  # a chunk_align-sized piece of the prompt
    assert sched.requests["w"].status is RequestStatus.RUNNING


def test_progress_when_the_only_urgent_decode_preempts_itself():
    # u (urgent, the tail) needs a page and the pool is full: it preempts itself. x is
    # relaxed and does not fit the (impossible) budget. The step must still run something.
    sched = make_fb(model=linear_model(a=1.0), num_pages=5, page_size=4)
    x = ahead_decode(sched, "x", 9.5, prompt_len=2, max_tokens=4)  # 12 tokens, 3 pages
    u = put_decode(sched, "u", [9.95], prompt_len=8, max_tokens=4)  # needs a 3rd page
    assert sched.kv.num_free_pages == 0
    plan = sched.schedule(NOW)
    assert plan.preempted == [u]
    assert chunks_of(plan) == [("x", 1)]
    assert x.status is RequestStatus.RUNNING and u.status is RequestStatus.WAITING
    sched.kv.check_invariants()


def test_forced_progress_preempts_when_the_pool_is_full():
    # margin 0 and an impossible budget: nothing is urgent and nothing fits, so the most
    # urgent request is forced; every request needs a page, which only preemption frees.
    sched = make_fb(FairBatchingConfig(urgency_margin=0.0), model=linear_model(a=1.0),
                    num_pages=4, page_size=4)
    first = ahead_decode(sched, "first", 9.4, k=8, prompt_len=5, max_tokens=8)  # due 10.2
    tail = put_decode(sched, "tail", [9.5], prompt_len=4, max_tokens=8, tpot_slo=1.0)
    assert sched.kv.num_free_pages == 0  # first: 3 pages, needs a 4th; tail: 1, needs 2
    assert sched.due(tail) == pytest.approx(10.5)
    plan = sched.schedule(NOW)
    assert chunks_of(plan) == [("first", 1)]
    assert plan.preempted == [tail]
    assert first.status is RequestStatus.RUNNING and len(sched.kv.block_table("first")) == 4
    sched.kv.check_invariants()


# ----- KV full -------------------------------------------------------------------------------

def test_kv_full_preempts_tail_for_a_decode_and_admits_nothing():
    sched = make_fb(num_pages=8, page_size=4)
    # u: 9 tokens, due 10.05 (urgent), holds 2 pages and needs a 3rd for its next token
    u = put_decode(sched, "u", [9.95], prompt_len=8, max_tokens=4)
    # r, v: 12 tokens each (3 pages, enough), due 10.7 and 10.6 (relaxed); v is the tail
    r = ahead_decode(sched, "r", 9.7, prompt_len=2, max_tokens=20)
    v = ahead_decode(sched, "v", 9.6, prompt_len=2, max_tokens=20)
    w = put_waiting(sched, "w", 4, arrival=9.0)  # one page: would fit after v goes
    assert sched.kv.num_free_pages == 0
    plan = sched.schedule(NOW)
    # u preempts the tail v (3 pages back, u takes 1). 2 pages are then free, but as in
    # every policy no newcomer is admitted in a preempting step (w must not displace v).
    assert ids(plan.preempted) == ["v"]
    assert chunks_of(plan) == [("u", 1), ("r", 1)]
    assert v.status is RequestStatus.WAITING and v.num_computed_tokens == 0
    assert ids(sched.waiting) == ["v", "w"] and w.status is RequestStatus.WAITING
    assert sched.kv.num_free_pages == 2 and sched.kv.block_table("w") == []
    assert u.status is r.status is RequestStatus.RUNNING
    sched.kv.check_invariants()


def test_preempted_victim_that_was_scheduled_leaves_the_plan():
    sched = make_fb(num_pages=4, page_size=4)
    a = put_decode(sched, "a", [9.97], prompt_len=8, max_tokens=4)  # due 10.07, needs a page
    b = put_decode(sched, "b", [9.95], prompt_len=5, max_tokens=4)  # due 10.05, the tail
    assert sched.kv.num_free_pages == 0 and ids(sched.running) == ["a", "b"]
    plan = sched.schedule(NOW)
    # b (earliest due) is scheduled first; a then needs a page and preempts the tail, b.
    assert chunks_of(plan) == [("a", 1)]
    assert plan.preempted == [b] and plan.bucket == (16, 4)
    assert b.status is RequestStatus.WAITING and sched.kv.block_table("b") == []
    assert a.status is RequestStatus.RUNNING and len(sched.kv.block_table("a")) == 3
    sched.kv.check_invariants()


def test_waiting_prompt_that_does_not_fit_stops_admission():
    sched = make_fb(num_pages=10, page_size=4)
    put_decode(sched, "d", [9.95], prompt_len=24, max_tokens=4)  # 7 pages after its token
    put_waiting(sched, "big", 16, arrival=9.0)  # 4 pages; 3 free
    put_waiting(sched, "small", 4, arrival=9.1)  # 1 page: would fit, may not jump
    plan = sched.schedule(NOW)
    assert chunks_of(plan) == [("d", 1)]
    assert ids(sched.waiting) == ["big", "small"]


# ----- prefill order -------------------------------------------------------------------------
# A long prompt with a lenient SLO of its own ("long": 300 tokens, TTFT 20 s) that arrived
# before a short one with the default 3 s SLO ("short": 50 tokens). The step holds 256
# tokens and no decodes, so whichever goes first takes it. The queue's prefill time is
# 350 tokens x ~1.04 ms (a full step's 0.2665 s / 256) = 0.364 s.

def prefill_race(long_arrival: float, short_arrival: float, **config):
    sched = make_fb(FairBatchingConfig(**config), max_tokens=256)
    put_waiting(sched, "long", 300, arrival=long_arrival, ttft_slo=20.0)
    put_waiting(sched, "short", 50, arrival=short_arrival)
    assert sched.prefill_time(350) == pytest.approx(350 * (A + 256 * B_PREFILL) / 256)
    return chunks_of(sched.schedule(NOW))


def test_prefill_time_sums_the_chunks_attention_included():
    coef = np.array([0.01, 1e-3, 2e-3, 1e-6, 3e-5, 0.0])  # attention work grows per chunk
    sched = make_fb(model=LatencyModel({p: coef for p in BUCKETS.pairs()}), max_tokens=128)
    by_hand = sum(sched.latency.predict(BUCKETS.pick(128, 1), StepFeatures.of_chunks(
        [(128, 128 * (i + 1), False)])) for i in range(5))
    assert sched.prefill_time(5 * 128) == pytest.approx(by_hand, rel=1e-12)
    assert sched.prefill_time(0) == 0.0


def test_prefills_go_first_come_first_served_while_no_deadline_is_at_stake():
    # Earliest deadline: short's, 9.5 + 3 = 12.5, 2.5 s away; 2 x 0.364 s fits: FCFS.
    assert prefill_race(9.0, 9.5) == [("long", 256)]


def test_prefills_go_by_deadline_once_one_is_at_stake():
    # short is due at 7.5 + 3 = 10.5, 0.5 s away: under 2 x 0.364 s, so EDF...
    assert prefill_race(7.0, 7.5) == [("short", 50), ("long", 206)]
    # ...but with a headroom of 1 the queue (0.364 s) still fits: FCFS.
    assert prefill_race(7.0, 7.5, fcfs_headroom=1.0) == [("long", 256)]


def test_fcfs_headroom_none_is_always_by_deadline():
    assert prefill_race(9.0, 9.5, fcfs_headroom=None) == [("short", 50), ("long", 206)]



@pytest.mark.parametrize("late_last", [True, False])
def test_a_prompt_already_late_goes_after_those_still_on_time(late_last):
    sched = make_fb(FairBatchingConfig(second_deadline_when_late=late_last), max_tokens=256)
    put_waiting(sched, "late", 200, arrival=NOW - 3.05)  # due 0.05 s ago: late whatever runs
    put_waiting(sched, "on_time", 50, arrival=NOW - 2.5)  # due in 0.5 s
    # A deadline is at stake (EDF). The late prompt is still served, after the other.
    expected = ([("on_time", 50), ("late", 200)] if late_last
                else [("late", 200), ("on_time", 50)])
    assert chunks_of(sched.schedule(NOW)) == expected
    assert sched.num_late_prompts == (1 if late_last else 0)



@pytest.mark.parametrize(("newcomer_arrival", "first"), [(NOW, "late"), (NOW - 0.1, "new")])
def test_a_late_prompt_waits_at_most_one_more_ttft_slo(newcomer_arrival, first):
    """Its second deadline is one TTFT SLO after the first (12.95 here): it goes before a
    prompt due after that and after one due before."""
    sched = make_fb(max_tokens=256)
    put_waiting(sched, "late", 100, arrival=NOW - 3.05)  # due at 9.95, late
    put_waiting(sched, "on_time", 50, arrival=NOW - 2.5)  # due at 10.5: EDF
    put_waiting(sched, "new", 100, arrival=newcomer_arrival)  # due at 13.0 or 12.9
    order = [rid for rid, _ in chunks_of(sched.schedule(NOW))]
    assert order[0] == "on_time" and order[1] == first

def test_a_prompt_that_can_still_make_it_alone_keeps_its_place():
    sched = make_fb(max_tokens=256)
    put_waiting(sched, "tight", 200, arrival=NOW - 2.7)  # due in 0.3 s; needs ~0.21 s alone
    put_waiting(sched, "later", 50, arrival=NOW - 2.5)
    assert sched.prefill_time(200) < 0.3
    assert chunks_of(sched.schedule(NOW))[0] == ("tight", 200)
    assert sched.num_late_prompts == 0

def test_fcfs_keeps_an_earlier_own_deadline():
    sched = make_fb()
    late = put_waiting(sched, "late", 10, arrival=9.0)  # FCFS key 9 + 3 = 12
    urgent = put_waiting(sched, "urgent", 10, arrival=9.5, ttft_slo=0.6)  # due at 10.1
    assert sched.fcfs_key(late) == pytest.approx(12.0)
    assert sched.fcfs_key(urgent) == pytest.approx(10.1)
    assert chunks_of(sched.schedule(NOW))[0] == ("urgent", 10)


def test_running_prompts_follow_the_same_order():
    # Both partly prefilled, running: the same race, decided by the same order.
    for long_arrival, short_arrival, first in ((9.0, 9.5, "long"), (7.0, 7.5, "short")):
        sched = make_fb(max_tokens=256)
        for rid, n, arrival, slo in (("long", 316, long_arrival, 20.0),
                                     ("short", 66, short_arrival, None)):
            r = put_waiting(sched, rid, n, arrival=arrival, ttft_slo=slo)
            assert sched.kv.ensure(rid, 16)
            sched.admit(r, arrival)
            r.num_computed_tokens = 16
        assert chunks_of(sched.schedule(NOW))[0][0] == first


# ----- empty queue ---------------------------------------------------------------------------

def test_empty_queue_gives_empty_plan():
    sched = make_fb()
    plan = sched.schedule(NOW)
    assert plan.is_empty and plan.bucket == (0, 0) and plan.preempted == []


# ----- load estimate -------------------------------------------------------------------------

def test_load_estimate_by_hand():
    sched = make_fb()
    ahead_decode(sched, "d1", 9.5)
    ahead_decode(sched, "d2", 9.6, tpot_slo=0.05)
    p = put_waiting(sched, "p", 200, arrival=9.0)
    p.status = RequestStatus.RUNNING  # a partly prefilled prompt: 120 tokens left
    sched.waiting.remove(p)
    sched.running.append(p)
    p.num_computed_tokens = 80
    put_waiting(sched, "w", 100, arrival=9.5)

    est = sched.load_estimate(NOW)

    horizon = 3.0  # the TTFT SLO
    decode_step = A + 2 * C_DECODE  # 0.0205 s for both decodes
    decode_time = horizon / 0.05 * decode_step  # one step per min TPOT: 60 steps = 1.23 s
    rate = 512 / (A + 512 * B_PREFILL)  # prefill tokens per second at the largest bucket
    expected = (horizon - decode_time) * rate - (120 + 100)
    assert est["horizon_s"] == horizon
    assert est["decode_time_s"] == pytest.approx(decode_time)
    assert est["prefill_tokens_per_s"] == pytest.approx(rate)
    assert est["queued_prefill_tokens"] == 220
    assert est["prefill_admission_budget"] == pytest.approx(expected)
    assert (est["num_running"], est["num_waiting"]) == (3, 1)


def test_load_estimate_falls_with_queued_prompts_and_decodes():
    sched = make_fb(FairBatchingConfig(load_horizon_s=1.0))
    empty = sched.load_estimate(NOW)["prefill_admission_budget"]
    assert empty == pytest.approx(1.0 * 512 / (A + 0.512))
    last = empty
    for i in range(3):
        put_waiting(sched, f"w{i}", 50, arrival=9.0)
        now = sched.load_estimate(NOW)["prefill_admission_budget"]
        assert now == pytest.approx(last - 50)
        last = now
    for i in range(3):
        ahead_decode(sched, f"d{i}", 9.5)
        now = sched.load_estimate(NOW)["prefill_admission_budget"]
        assert now < last
        last = now
    # overload: more decode work than the horizon holds leaves no prefill capacity
    heavy = make_fb(model=linear_model(a=0.2))
    ahead_decode(heavy, "d", 9.5)
    put_waiting(heavy, "w", 10, arrival=9.0)
    est = heavy.load_estimate(NOW)
    assert est["decode_time_s"] == est["horizon_s"]
    assert est["prefill_admission_budget"] == -10


# ----- properties over random states ---------------------------------------------------------

PROP_BUCKETS = BucketConfig(token_buckets=(16, 32, 64, 128, 256), seq_buckets=(4, 8, 16))
SLOS = st.sampled_from([None, 0.05, 0.1, 0.2])


@st.composite
def monotone_models(draw, impossible: bool = False) -> LatencyModel:
    """Non-negative per-feature costs and an intercept growing with the bucket: larger
    buckets and more work never predict less."""
    a0 = draw(st.floats(1.0, 2.0) if impossible else st.floats(0.001, 0.02))
    a_tok, a_seq = draw(st.floats(0, 5e-5)), draw(st.floats(0, 5e-4))
    coef = [draw(st.floats(0, 5e-4)), draw(st.floats(0, 2e-3)), draw(st.floats(0, 1e-3)),
            draw(st.floats(0, 1e-3)), draw(st.floats(0, 1e-3))]
    return LatencyModel({(t, s): np.array([a0 + a_tok * t + a_seq * s] + coef)
                         for t, s in PROP_BUCKETS.pairs()})


@st.composite
def configs(draw) -> FairBatchingConfig:
    return FairBatchingConfig(
        anchor=draw(st.sampled_from(["first_token", "arrival"])),
        urgency_margin=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        max_decode_stall_s=draw(st.sampled_from([None, 0.05, 0.3])),
        max_decode_stall_tpots=draw(st.sampled_from([None, 1.5, 5.0])),
        chunk_align=draw(st.sampled_from([1, 8, 16])),
        adaptive_capacity=draw(st.booleans()), fair_formation=draw(st.booleans()))


@st.composite
def any_models(draw) -> LatencyModel:
    """Each bucket its own costs, unrelated to its neighbours' (a larger bucket may
    predict less); sometimes a slightly negative cost per decode (predictions then fall
    with work, yet stay positive)."""
    low = draw(st.sampled_from([0.0, 0.0, -2e-5]))
    return LatencyModel({b: np.array([draw(st.floats(0.001, 0.03)), draw(st.floats(0, 2e-3)),
                                      draw(st.floats(low, 2e-3))]
                                     + [draw(st.floats(0, 2e-3)) for _ in range(3)])
                         for b in PROP_BUCKETS.pairs()})


@st.composite
def random_states(draw, max_decodes: int = 10, models=None):
    config = draw(configs())
    if models is None:
        models = monotone_models(impossible=draw(st.booleans()))
    model = draw(models)
    page_size = draw(st.sampled_from([1, 2, 4, 16]))  # 1: every decode needs a page
    # (prompt, gaps between tokens, arrival-to-first-token, TTFT, TPOT): ahead of or
    # behind the envelope
    gaps = st.lists(st.floats(0.001, 0.3), min_size=1, max_size=12)
    decodes = draw(st.lists(st.tuples(st.integers(1, 60), gaps, st.floats(0, 2), SLOS, SLOS),
                            max_size=max_decodes))
    partial = draw(st.lists(st.integers(2, 80).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(1, n - 1))), max_size=3))
    waiting = draw(st.lists(st.tuples(st.integers(1, 300), st.floats(0, 4), SLOS),
                            max_size=8))
    held = sum(-(-(p + len(ts) - 1) // page_size) for p, ts, *_ in decodes)
    held += sum(-(-c // page_size) for _, c in partial)
    biggest = max([-(-(p + len(ts) + 4) // page_size) for p, ts, *_ in decodes]
                  + [-(-(n + 4) // page_size) for n, _ in partial]
                  + [-(-(n + 4) // page_size) for n, *_ in waiting] + [1])
    num_pages = max(held, biggest) + draw(st.sampled_from([0, 0, 1, 3, 8]))  # often full
    max_tokens = draw(st.none() | st.integers(1, 256))
    max_seqs = draw(st.none() | st.integers(1, 16))
    urgent_last = draw(st.booleans())  # running order by falling due: the tail is urgent
    return (config, model, page_size, num_pages, max_tokens, max_seqs, decodes, partial,
            waiting, urgent_last)


def build_random(state, cls: type[FairBatchingScheduler] = FairBatchingScheduler
                 ) -> FairBatchingScheduler:
    (config, model, page_size, num_pages, max_tokens, max_seqs, decodes, partial, waiting,
     urgent_last) = state
    limits = StepLimits.from_buckets(PROP_BUCKETS, max_tokens, max_seqs)
    sched = cls(limits, KVCacheManager(num_pages, page_size), model, config)
    for i, (prompt_len, gaps, lead, ttft, tpot) in enumerate(decodes):
        # token times: the last one ``gaps[-1]`` before NOW, earlier ones spaced by gaps
        times = [NOW - sum(gaps[k:]) for k in range(len(gaps))]
        put_decode(sched, f"d{i}", times, prompt_len=prompt_len, arrival=times[0] - lead,
                   max_tokens=len(times) + 4, ttft_slo=ttft, tpot_slo=tpot)
    for i, (n, computed) in enumerate(partial):
        r = Request(f"p{i}", [], SamplingParams(max_tokens=4, ignore_eos=True), NOW - 1,
                    prompt_len=n)
        sched.add_request(r)
        r.num_computed_tokens = computed
        assert sched.kv.ensure(r.request_id, computed)
        sched.admit(r, NOW - 1)
    for i, (n, ago, ttft) in enumerate(waiting):
        put_waiting(sched, f"w{i}", n, arrival=NOW - ago, ttft_slo=ttft)
    if urgent_last:  # the victims of preemption are then the most urgent requests
        sched.running.sort(key=sched.due, reverse=True)
    return sched


def snapshot(sched, plan: StepPlan):
    return ([(c.request.request_id, c.num_tokens, c.start, c.completes, c.is_decode)
             for c in plan.chunks], plan.bucket, ids(plan.preempted), ids(sched.running),
            ids(sched.waiting), {k: list(v) for k, v in sched.kv._tables.items()})


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states(max_decodes=24, models=monotone_models() | any_models()),
       st.lists(st.floats(0.0, 0.2), min_size=1, max_size=4))
def test_fast_schedule_decides_as_the_plain_reference(state, gaps):
    """schedule() inlines deadlines, features and bucket picks and clears runs of relaxed
    decodes with one prediction; step by step it must plan exactly as the plain
    formulation (tests/sched/fb_reference.py) does."""
    fast, ref = build_random(state), build_random(state, ReferenceFairBatching)
    now = NOW
    for gap in gaps:
        fast_plan, ref_plan = fast.schedule(now), ref.schedule(now)
        assert snapshot(fast, fast_plan) == snapshot(ref, ref_plan)
        now += gap
        for sched, plan in ((fast, fast_plan), (ref, ref_plan)):
            sched.on_step_done(plan, {c.request.request_id: OUT for c in plan.chunks
                                      if c.completes}, now)
        assert ids(fast.running) == ids(ref.running)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_inline_deadlines_are_due(state):
    sched = build_random(state)
    decodes, dues, tpots, partial = sched._split_running()
    assert ids(decodes) == ids(r for r in sched.running
                               if r.num_remaining == 1 and r.num_output_tokens)
    assert ids(partial) == ids(r for r in sched.running
                               if not (r.num_remaining == 1 and r.num_output_tokens))
    assert dues == [sched.due(r) for r in decodes]  # exactly, not approximately
    assert tpots == [sched.tpot_slo(r) for r in decodes]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_plans_respect_every_limit_and_always_progress(state):
    sched = build_random(state)
    limits = sched.limits
    work = sched.has_unfinished()
    running_before = {r.request_id for r in sched.running}

    plan = sched.schedule(NOW)

    if work:
        assert not plan.is_empty, "empty plan while work exists"
    else:
        assert plan.is_empty and plan.bucket == (0, 0)
        return
    rids = [c.request.request_id for c in plan.chunks]
    assert len(rids) == len(set(rids)), "a request appears twice in one plan"
    assert plan.num_tokens <= limits.max_num_batched_tokens
    assert plan.num_seqs <= limits.max_num_seqs
    assert plan.bucket == limits.buckets.pick(plan.num_tokens, plan.num_seqs)
    kv = sched.kv
    kv.check_invariants()  # nothing beyond the free pages was handed out
    for c in plan.chunks:
        r = c.request
        assert c.num_tokens >= 1 and c.start == r.num_computed_tokens
        assert c.start + c.num_tokens <= r.num_tokens
        assert r.status is RequestStatus.RUNNING
        assert len(kv.block_table(r.request_id)) >= kv.pages_for(c.kv_len)
    for r in plan.preempted:
        # a victim ran before, or was admitted earlier in this step (then it left the plan)
        assert r.request_id not in rids
        assert r.status is RequestStatus.WAITING and kv.block_table(r.request_id) == []
    if any(r.request_id in running_before for r in plan.preempted):
        # as in every policy, a newcomer never displaces a running request: newcomers sit
        # at the tail (evicted first) and nobody is admitted after a preemption
        assert {r for r in rids if r not in running_before} == set()
    for r in sched.waiting:
        assert kv.block_table(r.request_id) == []


@st.composite
def feasible_states(draw):
    """Running decodes with positive slack where the decode-only step fits every decode's
    slack by the model; a surge of prompts; ample KV.

    Every slack is also at least the smallest TPOT: below that, the design's budget
    max(min slack, min TPOT) deliberately lets a step run one TPOT and overrun the most
    urgent decode (``test_tiny_slack_may_be_overrun_by_at_most_one_tpot``)."""
    config = FairBatchingConfig(anchor=draw(st.sampled_from(["first_token", "arrival"])),
                                urgency_margin=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
                                chunk_align=draw(st.sampled_from([1, 16])),
                                fair_formation=draw(st.booleans()),
                                max_decode_stall_tpots=None)  # deadlines: the envelope
    model = draw(monotone_models())
    n = draw(st.integers(1, 12))
    decodes = draw(st.lists(st.tuples(st.integers(1, 200), st.integers(3, 30),
                                      st.sampled_from([0.05, 0.1, 0.2]), st.floats(0, 1)),
                            min_size=n, max_size=n))
    feats = StepFeatures.of_chunks((1, p + k, True) for p, k, _, _ in decodes)
    decode_only = model.predict(PROP_BUCKETS.pick(feats.num_tokens, feats.num_seqs), feats)
    floor = max(decode_only, min(t for _, _, t, _ in decodes))
    assume(all(k * t > floor for _, k, t, _ in decodes))
    waiting = draw(st.lists(st.tuples(st.integers(1, 400), st.floats(0, 3)), max_size=8))
    return config, model, decodes, floor, waiting


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feasible_states())
def test_no_decode_misses_its_envelope_when_a_feasible_plan_exists(state):
    config, model, decodes, floor, waiting = state
    sched = FairBatchingScheduler(StepLimits.from_buckets(PROP_BUCKETS),
                                  KVCacheManager(4096, 16), model, config)
    for i, (prompt_len, k, tpot, frac) in enumerate(decodes):
        slack = floor + frac * (k * tpot - floor)  # in [floor, k * tpot]
        due = NOW + slack
        if config.anchor == "first_token":
            first = due - k * tpot  # <= NOW
            arrival = first - 0.5
        else:
            arrival = due - 3.0 - k * tpot
            first = arrival + 0.5 * (NOW - arrival)
        times = [first + (NOW - first) * j / k for j in range(k)]
        r = put_decode(sched, f"d{i}", times, prompt_len=prompt_len, arrival=arrival,
                       tpot_slo=tpot)
        assert sched.due(r) == pytest.approx(due)
    for i, (n, ago) in enumerate(waiting):
        put_waiting(sched, f"w{i}", n, arrival=NOW - ago)
    dues = {r.request_id: sched.due(r) for r in sched.running}
    tpots = {r.request_id: sched.tpot_slo(r) for r in sched.running}

    plan = sched.schedule(NOW)

    end = NOW + step_time(sched, plan)
    ran = {c.request.request_id for c in plan.chunks}
    eps = 1e-9
    for rid, due in dues.items():
        if rid in ran:
            assert end <= due + eps, f"{rid} ran but finished after its deadline"
        else:  # skipped: still on time after this step, with a margin of TPOTs to spare
            assert due - end >= config.urgency_margin * tpots[rid] - eps
    if waiting and not config.fair_formation:
        assert [c.is_decode for c in plan.chunks[:len(dues)]] == [True] * len(dues)


def test_tiny_slack_may_be_overrun_by_at_most_one_tpot():
    """The design's budget is max(min slack, min TPOT): with slack below one TPOT the step
    still runs up to a TPOT, so the most urgent decode can be late by the difference."""
    sched = make_fb()
    d = put_decode(sched, "d", [9.97], prompt_len=8)  # due 10.07: slack 0.07 < TPOT 0.1
    put_waiting(sched, "w", 300, arrival=9.5)
    plan = sched.schedule(NOW)
    t = step_time(sched, plan)
    assert chunks_of(plan) == [("d", 1), ("w", 80)] and t == pytest.approx(0.0955)
    assert NOW + t > sched.due(d)  # late by 25.5 ms, but the step stays within one TPOT
    assert t <= 0.1


# ----- bounded stalls in simulation ----------------------------------------------------------

def bursty_workload(seed: int) -> list[SimRequest]:
    """Long-output requests that bank decode slack while the engine is quiet, then two
    bursts of long prompts."""
    rng = random.Random(seed)
    reqs = [SimRequest(0.3 * i, rng.randint(16, 64), rng.randint(100, 160)) for i in range(6)]
    for burst_at in (2.0, 4.5):
        reqs += [SimRequest(burst_at + rng.uniform(0, 0.05), rng.randint(200, 500),
                            rng.randint(5, 40)) for _ in range(20)]
    return reqs


def max_gap(requests) -> float:
    return max(b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:],
                                                       strict=False))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_decode_stall_bounds_every_inter_token_gap(seed):
    model = linear_model(a=0.004, b=0.0004, c=0.0005)
    cap = 0.2
    workload = bursty_workload(seed)

    def simulate(stall):
        config = FairBatchingConfig(ttft_slo_s=5.0, tpot_slo_s=0.1, max_decode_stall_s=stall)
        sched = make_fb(config, model=model, num_pages=4096)
        return Simulator(sched, model, noise=0.0).run(workload).requests

    capped = simulate(cap)
    assert [r.num_output_tokens for r in capped] == [
        w.output_len for w in sorted(workload, key=lambda w: w.arrival_s)]
    assert max_gap(capped) <= cap + 1e-9
    uncapped = simulate(None)
    assert max_gap(uncapped) > 2 * cap  # banked slack alone lets decodes stall far longer


# ----- efficiency knee ----------------------------------------------------------------------

def knee_model(buckets: BucketConfig = BUCKETS) -> LatencyModel:
    """Per-token prefill cost falls until 256 tokens and is flat beyond: 20 ms floor, then
    0.1 ms per padded token above 256 (intercepts only, so contents do not matter)."""
    coef = {b: np.array([0.02 + 1e-4 * max(0, b[0] - 256) + 1e-5 * b[0], 0, 0, 0, 0, 0])
            for b in buckets.pairs()}
    return LatencyModel(coef)


def test_knee_is_where_per_token_cost_stops_falling():
    sched = FairBatchingScheduler(StepLimits.from_buckets(BUCKETS), KVCacheManager(1024, 16),
                                  knee_model(), FairBatchingConfig())
    costs = {t: knee_model().coefficients[(t, min(s for s in BUCKETS.seq_buckets if s <= t))][0]
             / t for t in BUCKETS.token_buckets}
    best = min(costs.values())
    expected = min(t for t, c in costs.items() if c <= best * 1.05)
    assert sched.step_tokens == expected < BUCKETS.max_tokens


def test_knee_caps_prefill_but_not_urgent_decodes():
    sched = FairBatchingScheduler(StepLimits.from_buckets(BUCKETS), KVCacheManager(4096, 16),
                                  knee_model(), FairBatchingConfig(step_tokens=8))
    for i in range(12):  # 12 urgent decodes: more than the 8-token cap
        put_decode(sched, f"u{i}", [9.95])
    put_waiting(sched, "w", 300, arrival=9.0)
    plan = sched.schedule(NOW)
    names = [c.request.request_id for c in plan.chunks]
    assert sum(n.startswith("u") for n in names) == 12  # urgent work ignores the cap
    assert "w" not in names  # the prompt gets no room past the cap
