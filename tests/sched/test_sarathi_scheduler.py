"""The Sarathi-Serve stall-free policy on hand-built states with hand-computed plans:
decodes first (running order), then ongoing prefills, then new prompts FCFS chunked to
the budget left; FCFS admission without skipping; the seq cap; preemption; and a
stall-free property over random workloads."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fbjax.config import BucketConfig
from fbjax.sched.base import StepLimits
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.registry import make_scheduler
from fbjax.sched.request import RequestStatus
from fbjax.sched.sarathi import SarathiScheduler
from tests.sched.helpers import (
    OUT_TOKEN,
    chunks_of,
    ids,
    make_policy,
    make_request,
    owned_pages,
    put_running,
)


def make_sched(**kwargs) -> SarathiScheduler:
    return make_policy(SarathiScheduler, **kwargs)


# ----- order: decodes, ongoing prefills, new prompts ------------------------------------------

def test_decodes_first_then_ongoing_prefills_then_new_fcfs():
    sched = make_sched(max_tokens=32)  # budget 32, 8 seqs
    # running order mixes prefills and decodes; Sarathi pulls every decode to the front
    put_running(sched, make_request("p1", 12), computed=4)  # 8 left
    put_running(sched, make_request("d1", 5), computed=5, outputs=1)
    put_running(sched, make_request("p2", 20), computed=8)  # 12 left
    put_running(sched, make_request("d2", 3), computed=4, outputs=2)
    for rid, n in (("w1", 6), ("w2", 10), ("w3", 3)):
        sched.add_request(make_request(rid, n, arrival=1.0))

    plan = sched.schedule(now=2.0)

    # 1 + 1 decodes, 8 + 12 ongoing prefill (22), w1 whole (28), w2 chunked to 4 (32).
    assert chunks_of(plan) == [("d1", 1, 5), ("d2", 1, 4), ("p1", 8, 4), ("p2", 12, 8),
                               ("w1", 6, 0), ("w2", 4, 0)]
    assert plan.num_tokens == 32 and plan.bucket == (32, 8) and plan.preempted == []
    assert [c.is_decode for c in plan.chunks] == [True, True, False, False, False, False]
    assert [c.completes for c in plan.chunks] == [True, True, True, True, True, False]
    assert ids(sched.running) == ["p1", "d1", "p2", "d2", "w1", "w2"]
    assert ids(sched.waiting) == ["w3"]
    assert sched.requests["w1"].first_scheduled_time == 2.0
    assert sched.requests["w3"].status is RequestStatus.WAITING
    assert owned_pages(sched) == {"p1": 3, "d1": 2, "p2": 5, "d2": 2, "w1": 2, "w2": 1}
    sched.kv.check_invariants()


def test_ongoing_prefill_is_chunked_to_the_budget_left_after_decodes():
    sched = make_sched(max_tokens=16)
    put_running(sched, make_request("p", 40), computed=8)  # 32 left
    put_running(sched, make_request("d1", 4), computed=4, outputs=1)
    put_running(sched, make_request("d2", 4), computed=4, outputs=1)
    sched.add_request(make_request("w", 2))
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("d1", 1, 4), ("d2", 1, 4), ("p", 14, 8)]
    assert plan.bucket == (16, 4)
    assert ids(sched.waiting) == ["w"]


def test_decodes_take_the_budget_in_running_order():
    sched = make_sched(max_tokens=2)
    for rid in ("a", "b", "c"):
        put_running(sched, make_request(rid, 4), computed=4, outputs=1)
    sched.add_request(make_request("w", 1))
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("a", 1, 4), ("b", 1, 4)]
    assert ids(sched.waiting) == ["w"]


def test_chunked_prompt_over_steps_never_stalls_decodes():
    sched = make_sched(max_tokens=8)
    d = put_running(sched, make_request("d", 4, max_tokens=10), computed=4, outputs=1)
    sched.add_request(make_request("p", 20))
    seen = []
    for step in range(4):
        plan = sched.schedule(float(step))
        seen.append(chunks_of(plan))
        sched.on_step_done(plan, {c.request.request_id: OUT_TOKEN
                                  for c in plan.chunks if c.completes}, float(step))
    # the decode is in every step; the prompt gets the 7 tokens left: 7 + 7 + 6, then decodes
    assert seen == [[("d", 1, 4), ("p", 7, 0)], [("d", 1, 5), ("p", 7, 7)],
                    [("d", 1, 6), ("p", 6, 14)], [("d", 1, 7), ("p", 1, 20)]]
    assert d.token_times == [0.0, 0.0, 1.0, 2.0, 3.0]


# ----- FCFS admission without skipping ---------------------------------------------------------

def test_admission_stops_at_first_waiting_request_that_does_not_fit_kv():
    sched = make_sched(num_pages=6, page_size=4, max_tokens=32)
    put_running(sched, make_request("d", 12), computed=12, outputs=1)  # 3 pages, needs 4
    sched.add_request(make_request("big", 12))  # 3 pages: only 2 are free after d
    sched.add_request(make_request("small", 4))  # 1 page would fit, but must not jump
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("d", 1, 12)]
    assert plan.preempted == []
    assert ids(sched.waiting) == ["big", "small"]
    assert owned_pages(sched) == {"d": 4}
    assert sched.kv.num_free_pages == 2
    sched.kv.check_invariants()


def test_chunk_is_not_shrunk_to_fit_kv():
    # Sarathi chunks to the *token* budget; a chunk that then lacks pages stops admission.
    sched = make_sched(num_pages=8, page_size=4, max_tokens=32)
    put_running(sched, make_request("d", 12), computed=12, outputs=1)  # 4 pages after step
    sched.add_request(make_request("w1", 20))  # 20-token chunk = 5 pages > 4 free
    sched.add_request(make_request("w2", 2))
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("d", 1, 12)]
    assert ids(sched.waiting) == ["w1", "w2"]
    assert sched.kv.num_free_pages == 4


# ----- max seqs --------------------------------------------------------------------------------

def test_max_num_seqs_caps_new_prompts():
    sched = make_sched(max_tokens=32, max_seqs=3)
    put_running(sched, make_request("d1", 4), computed=4, outputs=1)
    put_running(sched, make_request("d2", 4), computed=4, outputs=1)
    for rid in ("w1", "w2", "w3"):
        sched.add_request(make_request(rid, 2))
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("d1", 1, 4), ("d2", 1, 4), ("w1", 2, 0)]
    assert plan.bucket == (8, 4)
    assert ids(sched.waiting) == ["w2", "w3"]


def test_max_num_seqs_caps_decodes_before_prefills():
    sched = make_sched(max_tokens=32, max_seqs=2)
    put_running(sched, make_request("p", 10), computed=2)
    put_running(sched, make_request("a", 4), computed=4, outputs=1)
    put_running(sched, make_request("b", 4), computed=4, outputs=1)
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("a", 1, 4), ("b", 1, 4)]
    assert plan.bucket == (8, 2)


# ----- KV full: preempt the tail, admit nobody -------------------------------------------------

def test_kv_full_preempts_tail_for_recompute_and_admits_nothing():
    sched = make_sched(num_pages=6, page_size=4, max_tokens=32)
    a = put_running(sched, make_request("a", 8), computed=8, outputs=1)  # 2 pages, needs 3
    b = put_running(sched, make_request("b", 4), computed=4, outputs=1)  # 1 page, needs 2
    c = put_running(sched, make_request("c", 12), computed=12, outputs=1)  # 3 pages, needs 4
    sched.add_request(make_request("w", 1))  # would fit in the page left over
    assert sched.kv.num_free_pages == 0

    plan = sched.schedule(1.0)

    assert chunks_of(plan) == [("a", 1, 8), ("b", 1, 4)]
    assert plan.preempted == [c]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert ids(sched.running) == ["a", "b"]
    assert ids(sched.waiting) == ["c", "w"]  # victim first in line, newcomer not admitted
    assert sched.kv.num_free_pages == 1
    assert a.status is b.status is RequestStatus.RUNNING
    sched.kv.check_invariants()


def test_scheduled_decode_preempted_by_a_later_prefill_leaves_the_plan():
    # Decodes are pulled ahead of the running order, so the tail victim of a prefill's
    # page request may be a decode scheduled earlier in the same step.
    sched = make_sched(num_pages=4, page_size=4, max_tokens=32)
    p = put_running(sched, make_request("p", 12), computed=4)  # 1 page, needs 2 more
    d = put_running(sched, make_request("d", 5), computed=5, outputs=1)  # 2 pages, enough
    assert sched.kv.num_free_pages == 1
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("p", 8, 4)]
    assert plan.preempted == [d] and plan.bucket == (8, 2)
    assert d.status is RequestStatus.WAITING and ids(sched.waiting) == ["d"]
    assert owned_pages(sched) == {"p": 3} and sched.kv.num_free_pages == 1
    assert p.status is RequestStatus.RUNNING
    sched.kv.check_invariants()


def test_requester_at_tail_preempts_itself_others_continue():
    sched = make_sched(num_pages=4, page_size=4, max_tokens=32)
    put_running(sched, make_request("a", 6), computed=6, outputs=1)  # 2 pages, enough
    b = put_running(sched, make_request("b", 8), computed=8, outputs=1)  # needs a 3rd
    sched.add_request(make_request("w", 1))
    plan = sched.schedule(0.0)
    assert chunks_of(plan) == [("a", 1, 6)]
    assert plan.preempted == [b]
    assert ids(sched.waiting) == ["b", "w"]


# ----- nothing to do ----------------------------------------------------------------------------

def test_empty_queue_gives_empty_plan():
    sched = make_sched()
    plan = sched.schedule(0.0)
    assert plan.is_empty and plan.preempted == [] and plan.bucket == (0, 0)
    assert not sched.has_unfinished()


def test_registry_builds_sarathi():
    limits = StepLimits.from_buckets(BucketConfig(), None, None)
    kv = KVCacheManager(8, 4)
    sched = make_scheduler("sarathi", limits, kv)
    assert isinstance(sched, SarathiScheduler) and sched.kv is kv


# ----- property: stall-free ---------------------------------------------------------------------

@st.composite
def workloads(draw):
    page_size = draw(st.integers(1, 8))
    reqs = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40), st.integers(1, 12)),
                         min_size=1, max_size=8))
    biggest = max(-(-(p + m) // page_size) for _, p, m in reqs)
    num_pages = biggest + draw(st.integers(0, 12))
    max_tokens = draw(st.integers(1, 32))
    max_seqs = draw(st.integers(1, 8))
    return page_size, num_pages, max_tokens, max_seqs, reqs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_stall_free_and_within_limits(workload):
    page_size, num_pages, max_tokens, max_seqs, reqs = workload
    sched = make_sched(num_pages=num_pages, page_size=page_size, max_tokens=max_tokens,
                       max_seqs=max_seqs)
    requests = [make_request(f"r{i}", p, m, arrival=float(t)) for i, (t, p, m) in enumerate(reqs)]
    pending = sorted(requests, key=lambda r: r.arrival_time)
    bound = 6 + sum(p + m for _, p, m in reqs)
    step = 0
    while pending or sched.has_unfinished():
        assert step <= bound
        while pending and pending[0].arrival_time <= step:
            sched.add_request(pending.pop(0))
        decodes = [r for r in sched.running if r.num_remaining == 1 and r.num_output_tokens]
        work = sched.has_unfinished()
        plan = sched.schedule(float(step))
        assert plan.is_empty == (not work) or plan.preempted
        assert plan.num_tokens <= sched.limits.max_num_batched_tokens
        assert plan.num_seqs <= sched.limits.max_num_seqs
        rids = ids(c.request for c in plan.chunks)
        assert len(rids) == len(set(rids))
        if not plan.preempted:
            # stall-free: every decode runs, in running order, ahead of any prefill
            k = min(len(decodes), max_tokens, max_seqs)
            assert rids[:k] == ids(decodes[:k])
            assert all(c.num_tokens > 1 or not c.is_decode for c in plan.chunks[k:])
        sched.kv.check_invariants()
        sched.on_step_done(plan, {c.request.request_id: OUT_TOKEN
                                  for c in plan.chunks if c.completes}, float(step))
        step += 1
    assert all(r.num_output_tokens == r.sampling.max_tokens for r in requests)
    assert sched.kv.num_free_pages == num_pages
