"""The shortcuts of FairBatchingScheduler.schedule's single pass over the running list,
pinned to what they stand for: decode chunks made field by field, the sort skipped when
the running list is already in deadline order, urgent decodes joined in runs between
those that need a KV page."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fbjax.sched.base import ScheduledChunk
from tests.sched.fb_reference import ReferenceFairBatching
from tests.sched.test_fairbatching_scheduler import (
    NOW,
    OUT,
    build_random,
    ids,
    make_fb,
    put_decode,
    random_states,
    snapshot,
)


def test_decode_chunks_are_the_constructors():
    sched = make_fb()
    for i in range(5):
        put_decode(sched, f"d{i}", [9.0 + 0.1 * j for j in range(i + 1)], prompt_len=14 + i)
    decodes, partial = sched._running_by_kind()
    assert partial == []
    assert len(decodes.chunks) == 5
    for chunk in decodes.chunks:
        r = chunk.request
        # dataclass equality: every field, so one added to ScheduledChunk but not set by
        # the fast path fails here
        assert chunk == ScheduledChunk(r, 1, r.num_computed_tokens)


def test_deadline_order_is_detected_and_pages_are_found():
    sched = make_fb(page_size=4)
    put_decode(sched, "a", [9.0, 9.1], prompt_len=10)  # 11 computed: room in its page
    put_decode(sched, "b", [9.2, 9.3], prompt_len=11)  # 12 computed: its pages are full
    decodes, _ = sched._running_by_kind()
    assert decodes.in_order and decodes.needs_page == [1]
    assert decodes.tpot == 0.1
    sched.running.reverse()
    decodes, _ = sched._running_by_kind()
    assert not decodes.in_order and decodes.needs_page == [0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states(max_decodes=24), st.booleans(),
       st.lists(st.floats(0.0, 0.2), min_size=1, max_size=3))
def test_running_list_in_deadline_order_decides_as_the_reference(state, shared_tpot, gaps):
    """As the main property test, with the running list sorted by deadline (the sort is
    then skipped) and, if ``shared_tpot``, one TPOT SLO for all (urgency by binary
    search)."""
    scheds = [build_random(state), build_random(state, ReferenceFairBatching)]
    for sched in scheds:
        if shared_tpot:
            for r in sched.running:
                r.tpot_slo = 0.1
        sched.running.sort(key=sched.due)
    fast, ref = scheds
    now = NOW
    for gap in gaps:
        fast_plan, ref_plan = fast.schedule(now), ref.schedule(now)
        assert snapshot(fast, fast_plan) == snapshot(ref, ref_plan)
        now += gap
        for sched, plan in ((fast, fast_plan), (ref, ref_plan)):
            sched.on_step_done(plan, {c.request.request_id: OUT for c in plan.chunks
                                      if c.completes}, now)
        assert ids(fast.running) == ids(ref.running)
