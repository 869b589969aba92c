"""The vLLM-v1-style chunked-prefill policy on hand-built states with hand-computed plans,
plus a forward-progress property over random workloads with a small KV pool."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fbjax.config import BucketConfig
from fbjax.sched.base import StepLimits, StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.registry import make_scheduler
from fbjax.sched.request import Request, RequestStatus
from fbjax.sched.vllm import VLLMScheduler
from tests.sched.helpers import (
    OUT_TOKEN,
    PROMPT_TOKEN,
    chunks_of,
    ids,
    make_policy,
    make_request,
    owned_pages,
    put_running,
)

EOS = 2


def make_sched(**kwargs) -> VLLMScheduler:
    return make_policy(VLLMScheduler, **kwargs)


# ----- (a) the order of a mixed step -------------------------------------------------------

def test_running_first_then_waiting_fcfs_last_prompt_chunked():
    sched = make_sched(max_tokens=20)  # budget 20, max seqs 8
    d1 = put_running(sched, make_request("d1", 5), computed=5, outputs=1)  # decode
    p = put_running(sched, make_request("p", 12), computed=4)  # partial prefill, 8 left
    d2 = put_running(sched, make_request("d2", 3), computed=4, outputs=2)  # decode
    for rid, n in (("w1", 6), ("w2", 10), ("w3", 3)):
        sched.add_request(make_request(rid, n, arrival=1.0))

    plan = sched.schedule(now=2.0)

    # 1 + 8 + 1 running, then w1 whole (6), then w2 chunked to the 4 left; w3 waits.
    assert chunks_of(plan) == [("d1", 1, 5), ("p", 8, 4), ("d2", 1, 4),
                               ("w1", 6, 0), ("w2", 4, 0)]
    assert plan.num_tokens == 20 and plan.num_seqs == 5
    assert plan.bucket == (32, 8)
    assert plan.preempted == []
    assert ids(sched.running) == ["d1", "p", "d2", "w1", "w2"]
    assert ids(sched.waiting) == ["w3"]
    w1, w2, w3 = (sched.requests[r] for r in ("w1", "w2", "w3"))
    assert w1.status is w2.status is RequestStatus.RUNNING
    assert w3.status is RequestStatus.WAITING
    assert w1.first_scheduled_time == w2.first_scheduled_time == 2.0
    assert w3.first_scheduled_time is None
    # pages for computed + scheduled tokens, page size 4
    assert owned_pages(sched) == {"d1": 2, "p": 3, "d2": 2, "w1": 2, "w2": 1}
    assert [c.completes for c in plan.chunks] == [True, True, True, True, False]

    # Only completing chunks sample: w2's partial chunk must not be asked for a token.
    finished = sched.on_step_done(plan, {"d1": OUT_TOKEN, "p": OUT_TOKEN, "d2": OUT_TOKEN,
                                         "w1": OUT_TOKEN}, now=3.0)
    assert finished == []
    assert [(r.num_computed_tokens, r.num_output_tokens) for r in (d1, p, d2, w1, w2)] == [
        (6, 2), (12, 1), (5, 3), (6, 1), (4, 0)]
    assert w1.token_times == [3.0] and w2.token_times == []
    assert w1.token_ids == [PROMPT_TOKEN] * 6 + [OUT_TOKEN]

    # Next step: four decodes, the rest of w2 (6 from 4), then w3 whole.
    plan = sched.schedule(now=3.0)
    assert chunks_of(plan) == [("d1", 1, 6), ("p", 1, 12), ("d2", 1, 5), ("w1", 1, 6),
                               ("w2", 6, 4), ("w3", 3, 0)]
    assert plan.num_tokens == 13 and plan.bucket == (16, 8)
    sched.kv.check_invariants()


def test_budget_runs_out_inside_running_list():
    sched = make_sched(max_tokens=8)
    put_running(sched, make_request("big", 30), computed=4)  # 26 left
    put_running(sched, make_request("d", 3), computed=3, outputs=1)
    sched.add_request(make_request("w", 2))
    plan = sched.schedule(0.0)
    # the earlier running prefill takes the whole budget; the decode and w wait a step
    assert chunks_of(plan) == [("big", 8, 4)]
    assert plan.bucket == (8, 2)
    assert ids(sched.waiting) == ["w"]


# ----- (b) max_num_seqs ------------------------------------------------------------------

def test_max_num_seqs_caps_admission():
    sched = make_sched(max_tokens=32, max_seqs=3)
    put_running(sched, make_request("d1", 4), computed=4, outputs=1)
    put_running(sched, make_request("d2", 4), computed=4, outputs=1)
    for rid in ("w1", "w2", "w3"):
        sched.add_request(make_request(rid, 2))
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("d1", 1, 4), ("d2", 1, 4), ("w1", 2, 0)]
    assert plan.bucket == (8, 4)
    assert ids(sched.waiting) == ["w2", "w3"]
    assert "w2" not in sched.kv._tables


def test_max_num_seqs_caps_running_list():
    sched = make_sched(max_tokens=32, max_seqs=2)
    for rid in ("a", "b", "c"):
        put_running(sched, make_request(rid, 4), computed=4, outputs=1)
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("a", 1, 4), ("b", 1, 4)]
    assert plan.bucket == (8, 2)


def test_step_limits_are_capped_by_the_largest_bucket():
    buckets = BucketConfig(token_buckets=(8, 16), seq_buckets=(2, 4))
    limits = StepLimits.from_buckets(buckets, 100, 100)
    assert (limits.max_num_batched_tokens, limits.max_num_seqs) == (16, 4)
    limits = StepLimits.from_buckets(buckets, 10, 3)
    assert (limits.max_num_batched_tokens, limits.max_num_seqs) == (10, 3)
    limits = StepLimits.from_buckets(buckets)
    assert (limits.max_num_batched_tokens, limits.max_num_seqs) == (16, 4)


def test_max_seqs_is_a_compiled_seq_bucket():
    # A seq bucket above the largest token bucket is never compiled (pairs need
    # seqs <= tokens), so the cap must be the largest seq bucket that is.
    buckets = BucketConfig(token_buckets=(16, 32), seq_buckets=(4, 8, 16, 64))
    assert buckets.max_seqs == 16
    assert buckets.pick(32, 16) == (32, 16)
    with pytest.raises(ValueError):
        buckets.pick(32, 17)


# ----- (c) preemption when the KV pool is full ----------------------------------------------

def test_kv_full_preempts_tail_and_admits_nobody():
    sched = make_sched(num_pages=6, page_size=4, max_tokens=32)
    a = put_running(sched, make_request("a", 8), computed=8, outputs=1)  # 2 pages, needs 3
    b = put_running(sched, make_request("b", 4), computed=4, outputs=1)  # 1 page, needs 2
    c = put_running(sched, make_request("c", 12), computed=12, outputs=1)  # 3 pages, needs 4
    sched.add_request(make_request("w", 1))  # would fit in the page left over
    assert sched.kv.num_free_pages == 0

    plan = sched.schedule(1.0)

    assert chunks_of(plan) == [("a", 1, 8), ("b", 1, 4)]
    assert plan.preempted == [c]
    assert plan.bucket == (8, 2)
    assert c.status is RequestStatus.WAITING
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert c.output_token_ids == [OUT_TOKEN]  # kept: recompute covers prompt + outputs
    assert c.num_remaining == 13
    assert sched.kv.block_table("c") == []
    assert ids(sched.running) == ["a", "b"]
    assert ids(sched.waiting) == ["c", "w"]  # preempted goes to the FRONT
    assert owned_pages(sched) == {"a": 3, "b": 2}
    assert sched.kv.num_free_pages == 1
    assert a.status is b.status is RequestStatus.RUNNING
    sched.kv.check_invariants()

    # Next step: c is first in line again and, with a and b holding 5 pages, c's 13
    # tokens (4 pages) do not fit, so nobody is admitted (w may not jump the queue).
    sched.on_step_done(plan, {"a": OUT_TOKEN, "b": OUT_TOKEN}, 2.0)
    plan = sched.schedule(2.0)
    assert chunks_of(plan) == [("a", 1, 9), ("b", 1, 5)]
    assert plan.preempted == []
    assert ids(sched.waiting) == ["c", "w"]


def test_no_admission_in_a_step_that_preempted_even_if_it_would_fit():
    sched = make_sched(num_pages=3, page_size=4, max_tokens=3)  # budget 3
    put_running(sched, make_request("a", 4), computed=4, outputs=1)  # 1 page, needs 2
    b = put_running(sched, make_request("b", 8), computed=8, outputs=1)  # 2 pages
    assert sched.kv.num_free_pages == 0
    plan = sched.schedule(0.0)
    # b is preempted; a takes one of its pages. One page and 2 tokens of budget are
    # left, enough for a 2-token chunk of b, but nothing is admitted this step.
    assert chunks_of(plan) == [("a", 1, 4)]
    assert plan.preempted == [b]
    assert ids(sched.waiting) == ["b"] and sched.kv.num_free_pages == 1
    sched.on_step_done(plan, {"a": OUT_TOKEN}, 0.0)
    plan = sched.schedule(1.0)  # the next step readmits b, chunked to the budget left
    assert chunks_of(plan) == [("a", 1, 5), ("b", 2, 0)]
    assert plan.preempted == [] and b.status is RequestStatus.RUNNING


def test_preemption_of_several_keeps_their_order_at_the_front():
    sched = make_sched(num_pages=5, page_size=2, max_tokens=32)
    put_running(sched, make_request("a", 8, 2), computed=2)  # 1 page, 6 left -> 3 more
    put_running(sched, make_request("b", 6), computed=4)  # 2 pages
    put_running(sched, make_request("c", 6), computed=4)  # 2 pages
    sched.add_request(make_request("w", 1))
    assert sched.kv.num_free_pages == 0
    plan = sched.schedule(0.0)
    # none free: preempt c (2 free), still short: preempt b (4 free), then a fits.
    assert chunks_of(plan) == [("a", 6, 2)]
    assert ids(plan.preempted) == ["c", "b"]
    assert ids(sched.waiting) == ["b", "c", "w"]  # original order, ahead of newcomers
    assert ids(sched.running) == ["a"]
    assert owned_pages(sched) == {"a": 4}
    sched.kv.check_invariants()


def test_requester_at_the_tail_preempts_itself():
    sched = make_sched(num_pages=4, page_size=4, max_tokens=32)
    put_running(sched, make_request("a", 6), computed=6, outputs=1)  # 7 tokens, 2 pages ok
    b = put_running(sched, make_request("b", 8), computed=8, outputs=1)  # needs a 3rd page
    sched.add_request(make_request("w", 1))
    assert sched.kv.num_free_pages == 0
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("a", 1, 6)]
    assert plan.preempted == [b]
    assert ids(sched.waiting) == ["b", "w"]
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert owned_pages(sched) == {"a": 2}


# ----- (d) nothing to do -------------------------------------------------------------------

def test_empty_queue_gives_empty_plan():
    sched = make_sched()
    plan = sched.schedule(0.0)
    assert plan.is_empty and plan.chunks == [] and plan.preempted == []
    assert plan.bucket == (0, 0)
    assert plan.num_tokens == 0 and plan.num_seqs == 0
    assert not sched.has_unfinished()
    assert sched.on_step_done(plan, {}, 0.0) == []


# ----- (e) on_step_done ----------------------------------------------------------------------

def run_prefill(sched: VLLMScheduler, request: Request, token: int, now: float = 1.0):
    sched.add_request(request)
    plan = sched.schedule(now)
    assert chunks_of(plan) == [(request.request_id, request.prompt_len, 0)]
    return sched.on_step_done(plan, {request.request_id: token}, now)


def test_chunked_prefill_progression():
    sched = make_sched(max_tokens=8)
    r = make_request("r", 20, max_tokens=4)
    sched.add_request(r)
    seen = []
    for step in range(3):
        plan = sched.schedule(float(step))
        (chunk,) = plan.chunks
        seen.append((chunk.start, chunk.num_tokens, chunk.completes))
        sampled = {"r": OUT_TOKEN} if chunk.completes else {}
        sched.on_step_done(plan, sampled, float(step))
        assert r.num_computed_tokens == chunk.start + chunk.num_tokens
    assert seen == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert r.output_token_ids == [OUT_TOKEN] and r.token_times == [2.0]
    plan = sched.schedule(3.0)
    assert chunks_of(plan) == [("r", 1, 20)]


def test_eos_finishes_stopped_and_frees_pages():
    sched = make_sched()
    r = make_request("r", 5, eos=(EOS,))
    finished = run_prefill(sched, r, EOS)
    assert finished == [r]
    assert r.status is RequestStatus.FINISHED_STOPPED
    assert r.output_token_ids == [EOS]
    assert sched.kv.num_free_pages == sched.kv.num_pages
    assert sched.running == [] and "r" not in sched.requests
    assert not sched.has_unfinished()


def test_ignore_eos_keeps_going():
    sched = make_sched()
    r = make_request("r", 5, max_tokens=3, eos=(EOS,), ignore_eos=True)
    assert run_prefill(sched, r, EOS) == []
    assert r.status is RequestStatus.RUNNING
    plan = sched.schedule(2.0)
    assert sched.on_step_done(plan, {"r": EOS}, 2.0) == []
    plan = sched.schedule(3.0)
    assert sched.on_step_done(plan, {"r": EOS}, 3.0) == [r]
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert r.output_token_ids == [EOS, EOS, EOS]
    assert sched.kv.num_free_pages == sched.kv.num_pages


def test_stop_token_id_finishes_stopped():
    sched = make_sched()
    r = make_request("r", 5, stop_ids=(9,), eos=(EOS,))
    assert run_prefill(sched, r, OUT_TOKEN) == []
    plan = sched.schedule(2.0)
    assert sched.on_step_done(plan, {"r": 9}, 2.0) == [r]
    assert r.status is RequestStatus.FINISHED_STOPPED
    assert sched.kv.num_free_pages == sched.kv.num_pages


def test_max_tokens_finishes_length():
    sched = make_sched()
    r = make_request("r", 5, max_tokens=2, eos=(EOS,))
    other = put_running(sched, make_request("o", 3), computed=3, outputs=1)
    sched.add_request(r)
    plan = sched.schedule(1.0)
    assert chunks_of(plan) == [("o", 1, 3), ("r", 5, 0)]
    assert sched.on_step_done(plan, {"o": OUT_TOKEN, "r": OUT_TOKEN}, 1.0) == []
    plan = sched.schedule(2.0)
    assert chunks_of(plan) == [("o", 1, 4), ("r", 1, 5)]
    assert sched.on_step_done(plan, {"o": OUT_TOKEN, "r": OUT_TOKEN}, 2.0) == [r]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 2
    assert r.token_times == [1.0, 2.0]
    assert ids(sched.running) == ["o"] and other.status is RequestStatus.RUNNING
    assert owned_pages(sched) == {"o": 2}


def test_max_tokens_one_finishes_on_prefill():
    sched = make_sched()
    r = make_request("r", 5, max_tokens=1)
    assert run_prefill(sched, r, OUT_TOKEN) == [r]
    assert r.status is RequestStatus.FINISHED_LENGTH


# ----- (f) abort -----------------------------------------------------------------------------

def test_abort_waiting_and_running():
    sched = make_sched(num_pages=8, page_size=4)
    run = put_running(sched, make_request("run", 9), computed=9, outputs=1)
    wait = make_request("wait", 4)
    sched.add_request(wait)
    assert sched.kv.num_free_pages == 5

    assert sched.abort_request("wait") is wait
    assert wait.status is RequestStatus.FINISHED_ABORTED
    assert ids(sched.waiting) == [] and "wait" not in sched.requests
    assert sched.kv.num_free_pages == 5

    assert sched.abort_request("run") is run
    assert run.status is RequestStatus.FINISHED_ABORTED
    assert sched.running == [] and "run" not in sched.requests
    assert sched.kv.num_free_pages == 8
    assert not sched.has_unfinished()

    assert sched.abort_request("run") is None  # twice
    assert sched.abort_request("nobody") is None
    assert sched.schedule(0.0).is_empty
    sched.kv.check_invariants()


def test_abort_of_preempted_waiting_request():
    sched = make_sched(num_pages=4, page_size=4, max_tokens=32)
    put_running(sched, make_request("a", 6), computed=6, outputs=1)
    put_running(sched, make_request("b", 8), computed=8, outputs=1)
    plan = sched.schedule(0.0)
    assert ids(plan.preempted) == ["b"]
    assert sched.abort_request("b").status is RequestStatus.FINISHED_ABORTED
    assert ids(sched.waiting) == []
    assert owned_pages(sched) == {"a": 2}
    sched.kv.check_invariants()


def test_abort_while_step_runs_is_skipped():
    sched = make_sched()
    a = make_request("a", 4)
    b = make_request("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("a", 4, 0), ("b", 4, 0)]
    sched.abort_request("a")
    assert sched.on_step_done(plan, {"b": OUT_TOKEN}, 1.0) == []  # a's token not needed
    assert a.num_output_tokens == 0 and a.status is RequestStatus.FINISHED_ABORTED
    assert b.num_output_tokens == 1
    assert owned_pages(sched) == {"b": 1}


# ----- (g) add_request validation ------------------------------------------------------------

def test_duplicate_request_id_raises():
    sched = make_sched()
    sched.add_request(make_request("r", 4))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(make_request("r", 2))
    assert ids(sched.waiting) == ["r"]


def test_request_larger_than_pool_raises():
    sched = make_sched(num_pages=4, page_size=4)  # 16 tokens
    with pytest.raises(ValueError):
        sched.add_request(make_request("big", 10, max_tokens=7))
    with pytest.raises(ValueError):
        sched.add_request(make_request("huge", 17, max_tokens=1))
    assert not sched.has_unfinished() and sched.requests == {}
    sched.add_request(make_request("fits", 10, max_tokens=6))
    assert ids(sched.waiting) == ["fits"]


def test_registry_builds_vllm():
    limits = StepLimits.from_buckets(BucketConfig(), None, None)
    kv = KVCacheManager(8, 4)
    sched = make_scheduler("vllm", limits, kv)
    assert isinstance(sched, VLLMScheduler) and sched.kv is kv and sched.limits is limits
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("nope", limits, kv)


# ----- (h) forward progress ------------------------------------------------------------------

LADDER = st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True).map(
    lambda xs: tuple(sorted(xs)))


@st.composite
def workloads(draw):
    token_buckets = draw(LADDER)
    seq_buckets = draw(LADDER.filter(lambda s: s[0] <= token_buckets[-1]))
    buckets = BucketConfig(token_buckets=token_buckets, seq_buckets=seq_buckets)
    max_tokens = draw(st.none() | st.integers(1, buckets.max_tokens))
    max_seqs = draw(st.none() | st.integers(1, buckets.max_seqs))
    page_size = draw(st.integers(1, 8))
    n = draw(st.integers(1, 8))
    # (arrival step, prompt_len, max_tokens)
    reqs = draw(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 40), st.integers(1, 16)),
                         min_size=n, max_size=n))
    biggest = max(-(-(p + m) // page_size) for _, p, m in reqs)
    num_pages = biggest + draw(st.integers(0, 3))  # small: preemption is common
    aborts = draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 30), max_size=2))
    return buckets, max_tokens, max_seqs, page_size, num_pages, reqs, aborts


def check_plan(sched: VLLMScheduler, plan: StepPlan) -> None:
    limits = sched.limits
    assert plan.num_tokens <= limits.max_num_batched_tokens
    assert plan.num_seqs <= limits.max_num_seqs
    rids = [c.request.request_id for c in plan.chunks]
    assert len(rids) == len(set(rids)), "a request appears twice in one plan"
    for r in plan.preempted:
        assert r.request_id not in rids
        assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0
        assert sched.kv.block_table(r.request_id) == []
    if plan.is_empty:
        assert plan.bucket == (0, 0)
        return
    assert plan.bucket in limits.buckets.pairs()
    assert plan.num_tokens <= plan.bucket[0] and plan.num_seqs <= plan.bucket[1]
    for c in plan.chunks:
        r = c.request
        assert c.num_tokens >= 1
        assert r.status is RequestStatus.RUNNING
        assert c.start == r.num_computed_tokens
        assert c.start + c.num_tokens <= r.num_tokens
        assert len(sched.kv.block_table(r.request_id)) >= sched.kv.pages_for(
            c.start + c.num_tokens)


def check_state(sched: VLLMScheduler) -> None:
    kv = sched.kv
    kv.check_invariants()
    holders = {k for k, v in kv._tables.items() if v}
    assert holders <= {r.request_id for r in sched.running}  # waiting requests hold nothing
    assert len(sched.running) <= sched.limits.max_num_seqs
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert len(kv.block_table(r.request_id)) >= kv.pages_for(r.num_computed_tokens)
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0
    assert len(sched.running) + len(sched.waiting) == len(sched.requests)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_forward_progress(workload):
    buckets, max_tokens, max_seqs, page_size, num_pages, reqs, aborts = workload
    limits = StepLimits.from_buckets(buckets, max_tokens, max_seqs)
    sched = VLLMScheduler(limits, KVCacheManager(num_pages, page_size))
    requests = [make_request(f"r{i}", p, m, eos=(EOS,), arrival=float(t))
                for i, (t, p, m) in enumerate(reqs)]
    pending = sorted(range(len(requests)), key=lambda i: reqs[i][0])
    # The head of the running list is never preempted and gains >= 1 token per step,
    # so every request is done within its own token count of steps once it leads.
    bound = max(t for t, _, _ in reqs) + 1 + sum(p + m for _, p, m in reqs)

    step = 0
    while pending or sched.has_unfinished():
        assert step <= bound, f"no finish within {bound} steps"
        now = float(step)
        while pending and reqs[pending[0]][0] <= step:
            sched.add_request(requests[pending.pop(0)])
        for i, at in aborts.items():
            if at == step and requests[i].request_id in sched.requests:
                assert sched.abort_request(requests[i].request_id) is requests[i]
        check_state(sched)
        work = sched.has_unfinished()
        plan = sched.schedule(now)
        if work:
            assert not plan.is_empty, "empty plan while work remains"
        else:
            assert plan.is_empty and plan.bucket == (0, 0)
        check_plan(sched, plan)
        check_state(sched)
        sampled = {c.request.request_id: 1 for c in plan.chunks if c.completes}
        finished = sched.on_step_done(plan, sampled, now)
        for r in finished:
            assert r.status is RequestStatus.FINISHED_LENGTH
            assert sched.kv.block_table(r.request_id) == []
        check_state(sched)
        step += 1

    for i, r in enumerate(requests):
        assert r.finished
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert r.output_token_ids == [1] * r.sampling.max_tokens
        else:
            assert r.status is RequestStatus.FINISHED_ABORTED and i in aborts
    assert sched.running == [] and not sched.waiting and sched.requests == {}
    assert sched.kv.num_free_pages == num_pages
    sched.kv.check_invariants()
    event("preempted" if sched.num_preemptions else "no preemption")
