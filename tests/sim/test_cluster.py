"""The cluster simulator: a one-instance cluster is the single-instance simulator, every
request finishes under every routing policy, and routing decisions are the router's."""

from __future__ import annotations

import random

import pytest

from fbjax.routing.policy import POLICY_NAMES
from fbjax.sim.cluster import ClusterSimulator
from fbjax.sim.simulator import SimRequest, Simulator
from tests.sim.test_simulator import LINEAR, make, trace


def token_times(requests):
    return [(r.request_id, tuple(r.token_times)) for r in requests]


@pytest.mark.parametrize("policy", ["sarathi", "fairbatching"])
def test_one_instance_cluster_equals_the_single_instance_simulator(policy):
    arrivals = trace(3, n=40)
    alone = Simulator(make(policy), LINEAR).run(arrivals)
    cluster = ClusterSimulator([make(policy)], LINEAR, "round_robin").run(arrivals)
    assert token_times(cluster.requests) == token_times(alone.requests)
    assert cluster.end_time == alone.end_time
    assert cluster.steps[0] == alone.steps


@pytest.mark.parametrize("routing", POLICY_NAMES)
def test_every_request_finishes_on_some_instance(routing):
    arrivals = trace(5, n=60)
    result = ClusterSimulator([make("fairbatching") for _ in range(3)], LINEAR, routing,
                              poll_interval_s=0.02).run(arrivals)
    assert len(result.requests) == len(arrivals)
    for spec, request in zip(sorted(arrivals, key=lambda a: a.arrival_s), result.requests,
                             strict=True):
        assert request.finished and request.num_output_tokens == spec.output_len
    assert min(result.instance_of) >= 0 and sum(result.requests_per_instance()) == 60


def test_round_robin_alternates_and_least_requests_prefers_the_emptier_instance():
    # Two simultaneous arrivals, then a third while both are still busy with the first.
    arrivals = [SimRequest(0.0, 50, 200), SimRequest(0.0, 50, 2), SimRequest(0.2, 10, 2)]
    rr = ClusterSimulator([make("sarathi") for _ in range(2)], LINEAR, "round_robin").run(
        arrivals)
    assert rr.instance_of == [0, 1, 0]
    lr = ClusterSimulator([make("sarathi") for _ in range(2)], LINEAR, "least_requests").run(
        arrivals)
    assert lr.instance_of == [0, 1, 1]  # instance 1's short request is done by t=0.2


def test_pab_spreads_a_burst_by_budget_and_is_deterministic():
    rng = random.Random(0)
    burst = [SimRequest(0.0, rng.randint(50, 200), 10) for _ in range(12)]
    runs = [ClusterSimulator([make("fairbatching") for _ in range(3)], LINEAR, "pab",
                             poll_interval_s=0.0).run(burst) for _ in range(2)]
    assert runs[0].instance_of == runs[1].instance_of
    counts = runs[0].requests_per_instance()
    assert max(counts) - min(counts) <= 2, counts  # budgets shrink as prompts land


def test_pab_needs_a_load_estimate():
    with pytest.raises(ValueError, match="load estimate"):
        ClusterSimulator([make("sarathi")], LINEAR, "pab")
