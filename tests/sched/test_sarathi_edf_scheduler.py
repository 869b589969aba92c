"""Sarathi with deadline-ordered admission (``sarathi-edf``): Sarathi's budget, decodes
first and head-of-line rule, with prompts in TTFT-deadline order; with one TTFT SLO for
all it is Sarathi step for step."""

from __future__ import annotations

import functools
import random

from fbjax.sched.registry import make_scheduler
from fbjax.sched.request import RequestStatus
from fbjax.sched.sarathi import SarathiEDFScheduler, SarathiScheduler
from tests.sched.helpers import (
    OUT_TOKEN,
    chunks_of,
    ids,
    make_policy,
    make_request,
    put_running,
)


def make_edf(ttft_slo_s: float = 10.0, **kwargs) -> SarathiEDFScheduler:
    return make_policy(functools.partial(SarathiEDFScheduler, ttft_slo_s=ttft_slo_s), **kwargs)


def with_slo(rid: str, prompt_len: int, arrival: float, slo: float | None):
    request = make_request(rid, prompt_len, arrival=arrival)
    request.ttft_slo = slo
    return request


def test_waiting_prompts_are_admitted_by_deadline_without_skipping():
    sched = make_edf(max_tokens=16)
    sched.add_request(with_slo("early_loose", 10, 0.0, 9.0))  # due 9
    sched.add_request(with_slo("late_tight", 6, 1.0, 2.0))  # due 3
    sched.add_request(with_slo("default", 4, 0.5, None))  # due 10.5 (the default SLO)
    plan = sched.schedule(now=1.0)
    # late_tight whole (6), then early_loose chunked to the 10 left; default waits.
    assert chunks_of(plan) == [("late_tight", 6, 0), ("early_loose", 10, 0)]
    assert ids(sched.waiting) == ["default"]


def test_ongoing_prompts_continue_by_deadline_after_every_decode():
    sched = make_edf(max_tokens=16)
    put_running(sched, with_slo("p_loose", 20, 0.0, 9.0), computed=4)
    put_running(sched, with_slo("d", 5, 0.0, 1.0), computed=5, outputs=1)
    put_running(sched, with_slo("p_tight", 20, 0.5, 1.0), computed=8)
    plan = sched.schedule(now=1.0)
    assert chunks_of(plan) == [("d", 1, 5), ("p_tight", 12, 8), ("p_loose", 3, 4)]


def test_a_full_pool_blocks_admission_in_deadline_order():
    sched = make_edf(max_tokens=32, num_pages=8, page_size=4)  # 32 tokens of KV
    put_running(sched, with_slo("old", 12, 0.0, 1.0), computed=12, outputs=1)  # 4 pages
    sched.add_request(with_slo("big_tight", 20, 1.0, 1.0))  # due 2: needs 5 pages
    sched.add_request(with_slo("small_loose", 4, 0.0, 9.0))  # 1 page would fit
    plan = sched.schedule(now=1.0)
    # the decode runs; nothing is admitted past the head (no skipping, as Sarathi's FCFS)
    assert chunks_of(plan) == [("old", 1, 12)]
    assert sched.requests["small_loose"].status is RequestStatus.WAITING


def test_aborted_and_preempted_requests_keep_the_deadline_index_true():
    sched = make_edf(max_tokens=8)
    for rid, arrival in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        sched.add_request(with_slo(rid, 8, arrival, 5.0))
    sched.abort_request("a")
    plan = sched.schedule(now=2.0)
    assert chunks_of(plan) == [("b", 8, 0)]
    sched.preempt(sched.requests["b"])
    plan = sched.schedule(now=3.0)
    assert chunks_of(plan) == [("b", 8, 0)]  # still due before c
    assert [k[2] for k in sched._by_deadline] == ["c"]


def run(sched, arrivals) -> list:
    """Drive ``sched`` over (arrival step, prompt, max_tokens) to the end; its plans."""
    pending = [make_request(f"r{i}", p, m, arrival=float(t))
               for i, (t, p, m) in enumerate(arrivals)]
    plans, step = [], 0
    while pending or sched.has_unfinished():
        while pending and pending[0].arrival_time <= step:
            sched.add_request(pending.pop(0))
        plan = sched.schedule(float(step))
        plans.append((chunks_of(plan), ids(plan.preempted)))
        sched.on_step_done(plan, {c.request.request_id: OUT_TOKEN
                                  for c in plan.chunks if c.completes}, float(step))
        step += 1
        assert step < 10_000
    return plans


def test_one_slo_for_all_is_sarathi_step_for_step():
    """Deadline order is arrival order then, so the plans are Sarathi's, as long as
    nothing is preempted (Sarathi requeues a victim first in line; EDF by its deadline)."""
    rng = random.Random(3)
    arrivals = sorted((rng.randrange(40), rng.randint(1, 60), rng.randint(1, 12))
                      for _ in range(60))
    kw = {"max_tokens": 32, "num_pages": 1000, "page_size": 4}
    sarathi = run(make_policy(SarathiScheduler, **kw), arrivals)
    assert run(make_edf(**kw), arrivals) == sarathi
    assert max(len(chunks) for chunks, _ in sarathi) > 2  # steps really mixed requests


def test_registry_builds_it_with_the_default_slo():
    limits_sched = make_policy(SarathiScheduler, max_tokens=16)
    sched = make_scheduler("sarathi-edf", limits_sched.limits, limits_sched.kv, ttft_slo_s=2.5)
    assert isinstance(sched, SarathiEDFScheduler) and sched.ttft_slo_s == 2.5
    assert make_scheduler("sarathi-edf", limits_sched.limits, limits_sched.kv).ttft_slo_s == 3.0
