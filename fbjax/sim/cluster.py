"""Discrete-event simulation of N instances behind a router.

Each instance is the single-instance simulator's scheduler with its own KV pool and
clock; the router is the same policy and hold queue (``fbjax.router``) that the HTTP
router and the Ray Serve router run. Routing sees what a real router sees: each
instance's load report polled every ``poll_interval_s`` (FairBatching's Prefill
Admission Budget) corrected by the prompts sent since, and its own in-flight counts.

Events at one timestamp run in this order: steps that end, load polls, held
requests, arrivals, then idle instances form their next step (arrivals at t are
queued before a step that starts at t, as in the single-instance simulator).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from fbjax.metrics import (
    BenchmarkSummary,
    CapacityResult,
    RequestMetrics,
    capacity_search,
    summarize,
)
from fbjax.profiling.store import Profile
from fbjax.routing.dispatch import DEFAULT_MAX_HOLD_S, DEFAULT_POLL_INTERVAL_S, Dispatcher
from fbjax.routing.policy import ReplicaState, make_policy
from fbjax.sched.base import Scheduler
from fbjax.sched.latency import LatencyModel
from fbjax.sched.request import Request
from fbjax.sim.experiment import SLO, sim_requests
from fbjax.sim.instance import PolicySpec, build_scheduler
from fbjax.sim.simulator import (
    SimInstance,
    SimRequest,
    SimulationStalled,
    Simulator,
    StepRecord,
)
from fbjax.traces import Trace


@dataclasses.dataclass
class ClusterResult:
    requests: list[Request]  # in arrival order, all finished
    instance_of: list[int]  # the instance each request ran on
    steps: list[list[StepRecord]]  # per instance
    end_time: float
    num_held: int  # requests the router had to hold at least once

    def requests_per_instance(self) -> list[int]:
        counts = [0] * len(self.steps)
        for k in self.instance_of:
            counts[k] += 1
        return counts


class ClusterSimulator:
    """Runs requests through ``routing`` over one scheduler per instance."""

    def __init__(self, schedulers: Sequence[Scheduler], latency: LatencyModel, routing: str, *,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 max_hold_s: float = DEFAULT_MAX_HOLD_S,
                 max_held: int = 1_000_000, noise: float = 0.0, seed: int = 0,
                 max_steps: int = 50_000_000,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        if not schedulers:
            raise ValueError("a cluster needs at least one instance")
        self.routing = routing
        self.dispatcher: Dispatcher[Request] = Dispatcher(make_policy(routing), max_hold_s,
                                                          max_held)
        if routing == "pab" and not all(hasattr(s, "load_estimate") for s in schedulers):
            raise ValueError("pab routing needs instances that publish a load estimate "
                             "(the fairbatching scheduler)")
        self.instances = [SimInstance(s, Simulator(s, latency, noise=noise, seed=seed + k))
                          for k, s in enumerate(schedulers)]
        self.replicas = [ReplicaState(f"instance-{k}") for k in range(len(schedulers))]
        self.poll_interval_s = poll_interval_s
        self.max_steps = max_steps
        self.on_progress = on_progress
        self._last_poll = -math.inf

    def run(self, arrivals: Sequence[SimRequest]) -> ClusterResult:
        requests = self.instances[0].executor.requests_in_arrival_order(arrivals)
        position = {r.request_id: i for i, r in enumerate(requests)}
        instance_of = [-1] * len(requests)
        instances, replicas, dispatcher = self.instances, self.replicas, self.dispatcher
        nxt = finished = num_steps = 0
        now = 0.0

        def send(request: Request, k: int) -> None:
            instance_of[position[request.request_id]] = k
            instances[k].scheduler.add_request(request)

        while finished < len(requests):
            next_arrival = requests[nxt].arrival_time if nxt < len(requests) else math.inf
            next_release = dispatcher.next_release_time()
            now = max(now, min(next_arrival, min(i.busy_until for i in instances),
                               math.inf if next_release is None else next_release))
            if now == math.inf:
                raise SimulationStalled(f"cluster idle with {len(requests) - finished} "
                                        "requests unfinished and nothing left to happen")
            for k, inst in enumerate(instances):
                if inst.busy_until <= now:
                    done = inst.finish_step()
                    finished += len(done)
                    for _ in done:
                        replicas[k].on_finished()
            self._poll(now)
            for request, k in dispatcher.dispatch(now, replicas):
                send(request, k)
            while nxt < len(requests) and requests[nxt].arrival_time <= now:
                request = requests[nxt]
                k = dispatcher.route(request, request.prompt_len, now, replicas)
                if k is not None:
                    send(request, k)
                nxt += 1
            for inst in instances:
                if inst.plan is None:
                    inst.start_step(now)
                    num_steps += inst.plan is not None
            if num_steps >= self.max_steps:
                raise SimulationStalled(f"no end after {self.max_steps} steps")
            if self.on_progress is not None and num_steps % 1000 == 0:
                self.on_progress(finished, len(requests))
        if self.on_progress is not None:
            self.on_progress(finished, len(requests))
        return ClusterResult(requests, instance_of, [i.steps for i in instances], now,
                             dispatcher.num_held_total)

    def _poll(self, now: float) -> None:
        if self.routing != "pab" or now - self._last_poll < self.poll_interval_s:
            return
        self._last_poll = now
        for inst, replica in zip(self.instances, self.replicas, strict=True):
            replica.on_poll(inst.scheduler.load_estimate(now)["prefill_admission_budget"])


@dataclasses.dataclass
class ClusterOutcome:
    label: str
    rate_scale: float
    summary: BenchmarkSummary
    records: list[RequestMetrics]
    result: ClusterResult
    num_skipped: int


def simulate_cluster(trace: Trace, spec: PolicySpec, routing: str, num_instances: int,
                     profile: Profile, slo: SLO, *, rate_scale: float = 1.0, noise: float = 0.0,
                     seed: int = 0, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                     max_hold_s: float = DEFAULT_MAX_HOLD_S, envelope_anchor: str = "first_token",
                     on_progress: Callable[[int, int], None] | None = None) -> ClusterOutcome:
    """``trace`` at ``rate_scale`` times its rate over ``num_instances`` instances."""
    schedulers = [build_scheduler(spec, profile) for _ in range(num_instances)]
    requests, skipped = sim_requests(trace.scaled(rate_scale), slo, profile)
    result = ClusterSimulator(schedulers, profile.latency, routing,
                              poll_interval_s=poll_interval_s, max_hold_s=max_hold_s,
                              noise=noise, seed=seed, on_progress=on_progress).run(requests)
    records = [RequestMetrics.from_request(r) for r in result.requests]
    first = min((r.arrival_time for r in result.requests), default=0.0)
    summary = summarize(records, max(result.end_time - first, 1e-9), ttft_slo=slo.ttft_s,
                        tpot_slo=slo.tpot_s, envelope_anchor=envelope_anchor,
                        tbt_slo=slo.tbt_s)
    return ClusterOutcome(f"{spec.name}+{routing}", rate_scale, summary, records, result,
                          skipped)


def cluster_capacity(trace: Trace, spec: PolicySpec, routing: str, num_instances: int,
                     profile: Profile, slo: SLO, *, target: float = 0.99, tol: float = 0.02,
                     lo: float = 0.25, hi: float = 2.0,
                     on_point: Callable[[float, float], None] | None = None,
                     **kw) -> CapacityResult:
    """Highest rate scale at which the cluster's SLO attainment stays >= ``target``."""

    def attainment(scale: float) -> float:
        outcome = simulate_cluster(trace, spec, routing, num_instances, profile, slo,
                                   rate_scale=scale, **kw)
        value = outcome.summary.slo_attainment or 0.0
        if on_point is not None:
            on_point(scale, value)
        return value

    return capacity_search(attainment, target=target, lo=lo, hi=hi, tol=tol)
