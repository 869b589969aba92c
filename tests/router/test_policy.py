"""Routing policies on hand-built replica states with hand-computed choices."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fbjax.routing.dispatch import Dispatcher, QueueFull
from fbjax.routing.policy import (
    LeastRequests,
    NoHealthyReplica,
    PrefillAdmissionBudget,
    ReplicaState,
    RoundRobin,
    make_policy,
    release_target,
)


def replicas(*budgets, in_flight=None, healthy=None):
    n = len(budgets)
    in_flight = in_flight or [0] * n
    healthy = healthy or [True] * n
    return [ReplicaState(f"r{i}", healthy[i], in_flight[i], budgets[i]) for i in range(n)]


def test_round_robin_cycles_over_healthy_replicas():
    rs = replicas(None, None, None, healthy=[True, False, True])
    policy = RoundRobin()
    assert [policy.choose(rs, 10) for _ in range(4)] == [0, 2, 0, 2]


def test_least_requests_picks_fewest_in_flight_lowest_index_on_ties():
    rs = replicas(None, None, None, in_flight=[3, 1, 1])
    assert LeastRequests().choose(rs, 10) == 1
    rs[1].healthy = False
    assert LeastRequests().choose(rs, 10) == 2


def test_pab_picks_largest_budget_that_fits():
    rs = replicas(500.0, 2000.0, 1200.0)
    assert PrefillAdmissionBudget().choose(rs, 1000) == 1


def test_pab_ignores_replicas_that_cannot_fit_even_if_idle_by_count():
    # r0 has no requests in flight but no budget (e.g. long decodes); r2 is busier yet fits.
    rs = replicas(100.0, -50.0, 900.0, in_flight=[0, 0, 7])
    assert PrefillAdmissionBudget().choose(rs, 800) == 2


def test_pab_holds_when_nothing_fits_and_release_prefers_idle_then_largest_budget():
    rs = replicas(100.0, 300.0, -10.0, in_flight=[2, 3, 1])
    assert PrefillAdmissionBudget().choose(rs, 500) is None
    assert release_target(rs) == 1
    rs[2].in_flight = 0  # an idle replica starts it at once, whatever its budget says
    assert release_target(rs) == 2


def test_pab_subtracts_prompts_sent_since_last_poll():
    rs = replicas(1000.0, 900.0)
    policy = PrefillAdmissionBudget()
    first = policy.choose(rs, 300)
    assert first == 0
    rs[first].on_routed(300)  # r0 now 700 left: the next one goes to r1
    assert policy.choose(rs, 300) == 1
    rs[0].on_poll(1000.0)  # a fresh report replaces the correction
    assert rs[0].budget == 1000.0 and rs[0].in_flight == 1


def test_pab_falls_back_to_least_requests_before_any_report():
    rs = replicas(None, None, in_flight=[2, 0])
    assert PrefillAdmissionBudget().choose(rs, 50) == 1


def test_unhealthy_replicas_are_never_chosen_and_all_dead_is_an_error():
    rs = replicas(5000.0, 100.0, healthy=[False, True])
    assert PrefillAdmissionBudget().choose(rs, 50) == 1
    rs[1].healthy = False
    for name in ("pab", "least_requests", "round_robin"):
        with pytest.raises(NoHealthyReplica):
            make_policy(name).choose(rs, 50)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")


@given(st.lists(st.tuples(st.floats(-1e4, 1e4), st.booleans()), min_size=1, max_size=8),
       st.integers(1, 5000))
def test_pab_never_sends_where_budget_cannot_fit_when_another_can(states, prompt):
    rs = [ReplicaState(f"r{i}", healthy, 0, budget) for i, (budget, healthy) in
          enumerate(states)]
    if not any(r.healthy for r in rs):
        return
    choice = PrefillAdmissionBudget().choose(rs, prompt)
    someone_fits = any(r.healthy and r.budget >= prompt for r in rs)
    if someone_fits:
        assert choice is not None and rs[choice].healthy and rs[choice].budget >= prompt
    else:
        assert choice is None


def test_dispatcher_holds_then_places_when_budget_frees():
    rs = replicas(100.0, 200.0, in_flight=[1, 1])
    d = Dispatcher(PrefillAdmissionBudget(), max_hold_s=5.0, max_held=1)
    assert d.route("a", 500, 0.0, rs) is None and d.next_release_time() == 5.0
    with pytest.raises(QueueFull):
        d.route("b", 500, 0.1, rs)
    rs[0].on_poll(800.0)
    assert d.dispatch(1.0, rs) == [("a", 0)]
    assert rs[0].in_flight == 2 and rs[0].budget == 300.0 and not d.held


def test_dispatcher_releases_after_max_hold_and_lets_small_requests_pass():
    rs = replicas(100.0, 300.0, in_flight=[1, 1])
    d = Dispatcher(PrefillAdmissionBudget(), max_hold_s=2.0)
    assert d.route("big", 1000, 0.0, rs) is None
    assert d.route("small", 50, 0.5, rs) == 1  # not blocked behind the held one
    assert d.dispatch(1.9, rs) == []
    assert d.dispatch(2.0, rs) == [("big", 1)]  # timed out: largest budget (250 left)


def test_dispatcher_releases_exactly_at_next_release_time_despite_rounding():
    # 0.7 + 0.6 rounds so that (now - since) < 0.6: a simulator jumping to
    # next_release_time() must still see the request released, or it loops forever.
    rs = replicas(10.0, 10.0, in_flight=[1, 1])
    d = Dispatcher(PrefillAdmissionBudget(), max_hold_s=0.6)
    assert d.route("a", 500, 0.7, rs) is None
    assert d.dispatch(d.next_release_time(), rs) == [("a", 0)]
