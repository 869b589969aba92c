"""Serving metrics: hand-computed TTFT/TPOT/ITL/E2EL, SLO views, fairness, capacity search."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fbjax.metrics import (
    CapacityResult,
    RequestMetrics,
    capacity_search,
    format_table,
    max_tbt_stall,
    prefill_decode_share,
    summarize,
)
from fbjax.sched.request import Request, SamplingParams

rm = RequestMetrics.from_times


def test_single_request_by_hand():
    r = rm(10.0, [10.5, 10.6, 10.8, 11.1], prompt_len=7)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.2)  # (11.1 - 10.5) / 3
    assert r.itls == pytest.approx((0.1, 0.2, 0.3))
    assert r.e2el == pytest.approx(1.1)
    assert r.output_len == 4


def test_one_token_and_no_token():
    one = rm(0.0, [0.3])
    assert one.ttft == pytest.approx(0.3) and one.tpot is None and one.itls == ()
    assert one.e2el == pytest.approx(0.3)
    assert one.meets_slo(ttft_slo=0.5, tpot_slo=0.001)  # judged on TTFT only
    assert not one.meets_slo(ttft_slo=0.2, tpot_slo=1.0)
    assert one.meets_envelope(0.5, 0.001)
    none = rm(0.0, [])
    assert none.ttft is None and none.tpot is None and none.e2el is None
    assert not none.meets_slo(1.0, 1.0) and not none.meets_envelope(1.0, 1.0)


def test_from_request():
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=3), arrival_time=1.0,
                  ttft_slo=0.5, tpot_slo=0.1)
    for i, t in enumerate([1.2, 1.3, 1.5]):
        req.append_output(i, t)
    req.num_preemptions = 2
    r = RequestMetrics.from_request(req)
    assert r.request_id == "a" and r.prompt_len == 3 and r.num_preemptions == 2
    assert r.ttft == pytest.approx(0.2) and r.tpot == pytest.approx(0.15)
    assert r.ttft_slo == 0.5 and not r.meets_slo()  # per-request TPOT SLO 0.1 < 0.15


def test_non_monotone_times_rejected():
    with pytest.raises(ValueError):
        rm(0.0, [1.0, 0.5])


def _records():
    # arrival, token times  ->  ttft, tpot, itls, e2el (seconds)
    return [
        rm(0.0, [0.1, 0.2, 0.3], prompt_len=10),        # 0.1, 0.1, [.1,.1], 0.3
        rm(1.0, [1.5, 1.7, 1.9, 2.1], prompt_len=20),   # 0.5, 0.2, [.2,.2,.2], 1.1
        rm(2.0, [2.2], prompt_len=30),                  # 0.2, -, [], 0.2
        rm(3.0, [4.0, 4.05], prompt_len=40),            # 1.0, 0.05, [.05], 1.05
    ]


def test_summary_by_hand():
    s = summarize(_records(), duration_s=5.0, ttft_slo=0.6, tpot_slo=0.15)
    assert s.completed == 4 and s.num_requests == 4
    assert s.total_input_tokens == 100 and s.total_output_tokens == 10
    assert s.request_throughput == pytest.approx(0.8)
    assert s.output_throughput == pytest.approx(2.0)
    assert s.total_token_throughput == pytest.approx(22.0)
    # TTFT ms: 100, 500, 200, 1000
    assert s.ttft.mean_ms == pytest.approx(450.0)
    assert s.ttft.median_ms == pytest.approx(350.0)
    assert s.ttft.p(50) == pytest.approx(350.0)
    assert s.ttft.p(90) == pytest.approx(850.0)  # linear: 500 + 0.7 * 500
    assert s.ttft.p(99) == pytest.approx(985.0)
    # TPOT ms over outputs > 1 token: 100, 200, 50
    assert s.tpot.count == 3 and s.tpot.mean_ms == pytest.approx(350 / 3)
    assert s.tpot.median_ms == pytest.approx(100.0)
    # ITL ms: 100, 100, 200, 200, 200, 50
    assert s.itl.count == 6 and s.itl.mean_ms == pytest.approx(850 / 6)
    assert s.itl.median_ms == pytest.approx(150.0)
    # E2EL ms: 300, 1100, 200, 1050
    assert s.e2el.mean_ms == pytest.approx(662.5)
    assert s.max_tbt_stall_ms == pytest.approx(200.0)
    # SLO ttft 0.6 / tpot 0.15: r0 yes, r1 no (tpot), r2 yes (one token), r3 no (ttft)
    assert s.slo_attainment == pytest.approx(0.5)
    assert s.ttft_attainment == pytest.approx(0.75)
    assert s.tpot_attainment == pytest.approx(0.75)
    assert s.goodput == pytest.approx(2 / 5.0)


def test_per_request_slo_overrides_global():
    recs = _records()
    recs[1] = rm(1.0, [1.5, 1.7, 1.9, 2.1], prompt_len=20, tpot_slo=0.25)
    recs[3] = rm(3.0, [4.0, 4.05], prompt_len=40, ttft_slo=2.0)
    s = summarize(recs, duration_s=5.0, ttft_slo=0.6, tpot_slo=0.15)
    assert s.slo_attainment == pytest.approx(1.0) and s.goodput == pytest.approx(0.8)
    # per-request SLOs alone turn attainment on; the missing global criterion is not checked
    only = summarize([rm(0.0, [5.0, 9.0], tpot_slo=4.0)], duration_s=10.0)
    assert only.slo_attainment == 1.0


def test_no_slo_and_failed_requests():
    s = summarize(_records(), duration_s=5.0)
    assert s.slo_attainment is None and s.goodput is None and s.envelope_attainment is None
    s = summarize(_records() + [rm(4.0, [])], duration_s=5.0, ttft_slo=10.0, tpot_slo=10.0)
    assert s.completed == 4 and s.num_requests == 5
    assert s.slo_attainment == pytest.approx(0.8)  # the request with no output misses
    empty = summarize([], duration_s=1.0)
    assert empty.completed == 0 and math.isnan(empty.ttft.mean_ms)
    assert empty.to_dict()["mean_ttft_ms"] is None


def test_envelope_by_hand():
    # ttft_slo 1.0, tpot_slo 0.5: deadlines from arrival 0 are 1.0, 1.5, 2.0, 2.5
    early_first = rm(0.0, [0.2, 1.4, 1.9, 2.4])   # TPOT (2.4-0.2)/3 = 0.733 > 0.5
    assert early_first.meets_envelope(1.0, 0.5)  # TTFT slack leaks into TPOT
    assert not early_first.meets_slo(1.0, 0.5)
    assert not early_first.meets_envelope(1.0, 0.5, anchor="first_token")  # 1.4 > 0.2 + 0.5
    late_token = rm(0.0, [0.9, 1.0, 2.1, 2.2])    # token 2 due 2.0; TPOT 0.433 ok
    assert late_token.meets_slo(1.0, 0.5)
    assert not late_token.meets_envelope(1.0, 0.5)
    # first-token deadlines 0.9, 1.4, 1.9, 2.4: token 2 is late here too (the anchor at the
    # first token is never looser than the one at arrival + ttft_slo when TTFT is met)
    assert not late_token.meets_envelope(1.0, 0.5, anchor="first_token")
    exact = rm(0.0, [1.0, 1.5, 2.0, 2.5])
    assert exact.meets_envelope(1.0, 0.5) and exact.meets_slo(1.0, 0.5)
    s = summarize([early_first, late_token, exact], duration_s=3.0, ttft_slo=1.0, tpot_slo=0.5)
    assert s.envelope_attainment == pytest.approx(2 / 3)
    assert s.slo_attainment == pytest.approx(2 / 3)
    s2 = summarize([early_first, late_token, exact], duration_s=3.0, ttft_slo=1.0,
                   tpot_slo=0.5, envelope_anchor="first_token")
    assert s2.envelope_attainment == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        exact.meets_envelope(1.0, 0.5, anchor="bogus")


def test_slo_boundary_tolerates_float_rounding():
    times = [0.1 * k for k in range(1, 12)]  # accumulating 0.1 steps is not exact
    r = rm(0.0, times)
    assert r.meets_slo(ttft_slo=0.1, tpot_slo=0.1)
    assert r.meets_envelope(ttft_slo=0.1, tpot_slo=0.1)


def test_max_tbt_stall():
    assert max_tbt_stall(_records()) == pytest.approx(0.2)
    assert max_tbt_stall([rm(0.0, [1.0])]) == 0.0
    assert max_tbt_stall([]) == 0.0


def test_format_table_like_vllm():
    s = summarize(_records(), duration_s=5.0, ttft_slo=0.6, tpot_slo=0.15)
    text = format_table(s)
    lines = text.splitlines()
    assert lines[0] == "{:=^50}".format(" Serving Benchmark Result ")
    assert lines[-1] == "=" * 50
    assert "{:<40} {:<10}".format("Successful requests:", 4) in lines
    assert "{:<40} {:<10.2f}".format("Mean TTFT (ms):", 450.0) in lines
    assert "{:<40} {:<10.2f}".format("P99 TTFT (ms):", 985.0) in lines
    assert "{:<40} {:<10.2f}".format("Request goodput (req/s):", 0.4) in lines
    assert "{:<40} {:<10.2f}".format("SLO attainment (%):", 50.0) in lines
    for head in ("Time to First Token", "Time per Output Token (excl. 1st token)",
                 "Inter-token Latency", "End-to-end Latency"):
        assert f"{head:-^50}" in lines
    assert "n/a" in format_table(summarize([], duration_s=1.0))


def test_to_dict_keys():
    d = summarize(_records(), duration_s=5.0, ttft_slo=0.6, tpot_slo=0.15).to_dict()
    assert d["p99_ttft_ms"] == pytest.approx(985.0)
    assert d["median_itl_ms"] == pytest.approx(150.0)
    assert d["completed"] == 4 and d["slo_attainment"] == 0.5


# ----------------------------------------------------------------------------- fairness


def test_prefill_decode_share_by_hand():
    steps = [
        (0.10, 30, 10, True, True),    # contended: 0.075 prefill, 0.025 decode
        (0.20, 0, 20, True, True),     # contended: all decode (prefill starved)
        (0.50, 100, 0, True, False),   # no decode waiting: ignored
        (0.30, 0, 40, False, True),    # no prefill waiting: ignored
        (0.05, 0, 0, True, True),      # empty step: ignored
    ]
    share = prefill_decode_share(steps)
    assert share.contended_steps == 2
    assert share.prefill_s == pytest.approx(0.075)
    assert share.decode_s == pytest.approx(0.225)
    assert share.prefill_share == pytest.approx(0.25)
    assert share.decode_share == pytest.approx(0.75)
    assert math.isnan(prefill_decode_share([]).prefill_share)


# ----------------------------------------------------------------------------- capacity


def _curve(threshold: float):
    """A monotone attainment curve: 1.0 up to the threshold, then falling off."""
    calls: list[float] = []

    def attainment(scale: float) -> float:
        calls.append(scale)
        return 1.0 if scale <= threshold else max(0.0, 0.98 - (scale - threshold))

    return attainment, calls


@pytest.mark.parametrize("threshold", [0.05, 0.37, 1.0, 1.93, 5.5, 30.0])
def test_capacity_search_finds_threshold(threshold):
    f, calls = _curve(threshold)
    res = capacity_search(f, target=0.99, lo=0.25, hi=2.0, tol=0.02)
    assert isinstance(res, CapacityResult) and res.converged and not res.saturated
    assert res.rate_scale <= threshold < res.upper
    assert threshold - res.rate_scale <= 0.02 * res.upper
    assert res.attainment == 1.0
    assert len(res.points) == len(set(calls))  # each scale evaluated once, all recorded
    assert [p for p, _ in res.points] == sorted(p for p, _ in res.points)


def test_capacity_search_saturates_and_infeasible():
    res = capacity_search(lambda s: 1.0, lo=0.5, hi=1.0, max_expansions=3)
    assert res.saturated and not res.converged and res.rate_scale == 8.0 and res.upper is None
    res = capacity_search(lambda s: 0.5, lo=0.5, hi=1.0, max_expansions=3)
    assert res.rate_scale == 0.0 and not res.converged and res.attainment is None
    assert len(res.points) == 4


def test_capacity_search_max_iters_bounds_evaluations():
    f, calls = _curve(0.77)
    res = capacity_search(f, lo=0.5, hi=1.0, tol=1e-9, max_iters=5)
    assert not res.converged and len(calls) == 2 + 5
    assert res.rate_scale <= 0.77 < res.upper


@settings(max_examples=60, deadline=None)
@given(threshold=st.floats(0.01, 100.0), tol=st.sampled_from([0.005, 0.02, 0.1]))
def test_capacity_search_property(threshold, tol):
    res = capacity_search(lambda s: 1.0 if s <= threshold else 0.0, lo=0.25, hi=2.0, tol=tol,
                          max_iters=50)
    assert res.converged
    assert res.rate_scale <= threshold < res.upper
    assert res.upper - res.rate_scale <= tol * res.upper


def test_token_stall_slo_by_hand():
    # gaps 0.1 x 98, one 0.5 stall, 0.1: P99 of 100 gaps (linear) sits between 0.1 and 0.5
    times = [1.0 + 0.1 * i for i in range(99)] + [10.8 + 0.5, 11.3 + 0.1]
    r = RequestMetrics.from_times(0.0, times)
    p99 = float(np.percentile(np.diff(times), 99))
    assert 0.1 < p99 < 0.5
    assert r.meets_tbt(p99) and not r.meets_tbt(p99 - 1e-3)
    assert r.meets_tbt(None)
    assert RequestMetrics.from_times(0.0, [3.0]).meets_tbt(0.01)  # one token: no gap
    assert not RequestMetrics.from_times(0.0, []).meets_tbt(1.0)  # no token: a miss
    steady = RequestMetrics.from_times(0.0, [1.0 + 0.1 * i for i in range(10)])
    s = summarize([r, steady], 20.0, ttft_slo=2.0, tpot_slo=0.2, tbt_slo=p99 - 1e-3)
    # both meet TTFT and mean TPOT; only the steady one meets the stall bound
    assert s.tpot_attainment == 1.0 and s.tbt_attainment == 0.5 and s.slo_attainment == 0.5
    assert summarize([r], 20.0, ttft_slo=2.0).tbt_attainment is None
