"""Discrete-event simulator of one serving instance.

The scheduler objects are the engine's own; only the executor is virtual: each step
lasts what the LatencyModel predicts for its plan (times an optional seeded noise
factor) and produces placeholder tokens. Events are ordered by (time, kind, id) with
scheduling last within a timestamp (as in Vidur): arrivals at time t are queued
before the step that starts at t is formed. Identical inputs and seeds give identical
token timestamps.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence

from fbjax.sched.base import Scheduler, StepPlan
from fbjax.sched.kv_cache import BlockPageKeys
from fbjax.sched.latency import LatencyModel, StepFeatures
from fbjax.sched.request import Request, SamplingParams

PLACEHOLDER_TOKEN = 0


class SimulationStalled(RuntimeError):
    """The scheduler returned an empty plan with work pending and no arrival to wait for."""


@dataclasses.dataclass(frozen=True)
class SimRequest:
    """What the simulator needs of a request; traces produce these."""

    arrival_s: float
    prompt_len: int
    output_len: int
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    hash_ids: tuple[int, ...] = ()  # prefix-block hashes (Mooncake), for prefix caching
    hash_block_size: int = 0  # tokens per hash block


@dataclasses.dataclass(frozen=True)
class StepRecord:
    start: float
    duration: float
    bucket: tuple[int, int]
    prefill_tokens: int
    decode_tokens: int
    waiting_prefill: bool  # a prompt was waiting or partly done when the step began
    waiting_decode: bool  # a running request was ready to decode when the step began
    num_preempted: int


@dataclasses.dataclass
class SimResult:
    requests: list[Request]  # in arrival order, all finished
    steps: list[StepRecord]
    end_time: float


def plan_features(plan: StepPlan) -> StepFeatures:
    """``StepFeatures.of_chunks`` of the plan's chunks, summed inline (same values)."""
    return _features_and_samples(plan.chunks)[0]


def _features_and_samples(chunks) -> tuple[StepFeatures, dict[str, int]]:
    """The plan's features and the placeholder token of every chunk that samples, in
    one pass (this runs once per simulated step over every chunk)."""
    prefill = decodes = tokens = kv_read = max_kv = 0
    attn_qk = 0.0
    sampled = {}
    for c in chunks:
        q_len = c.num_tokens
        kv_len = c.start + q_len
        if c.is_decode:
            decodes += 1
        else:
            prefill += q_len
        tokens += q_len
        attn_qk += q_len * kv_len
        kv_read += kv_len
        if kv_len > max_kv:
            max_kv = kv_len
        if c.completes:
            sampled[c.request.request_id] = PLACEHOLDER_TOKEN
    feats = StepFeatures(prefill, decodes, tokens, len(chunks), attn_qk, kv_read, max_kv)
    return feats, sampled


class Simulator:
    """Runs a list of requests through ``scheduler`` with step times from ``latency``."""

    def __init__(self, scheduler: Scheduler, latency: LatencyModel, *, noise: float = 0.0,
                 seed: int = 0, max_steps: int = 50_000_000,
                 on_progress: Callable[[int, int], None] | None = None,
                 step_overhead_s: float = 0.0) -> None:
        if noise < 0 or step_overhead_s < 0:
            raise ValueError("noise and step_overhead_s must be >= 0")
        self.scheduler = scheduler
        self.latency = latency
        self.noise = noise
        # Host work per step outside the device call (scheduling, batch building,
        # fetching samples): a profile times the device call only; an engine on a CPU
        # spends a measurable share of each step on the host too.
        self.step_overhead_s = step_overhead_s
        self.rng = random.Random(seed)
        self.max_steps = max_steps
        self.on_progress = on_progress

    def step_time(self, plan: StepPlan, features: StepFeatures | None = None) -> float:
        if features is None:
            features = plan_features(plan)
        seconds = self.latency.predict(plan.bucket, features)
        if self.noise:
            seconds *= max(0.05, self.rng.gauss(1.0, self.noise))
        return seconds + self.step_overhead_s

    def run(self, arrivals: Sequence[SimRequest]) -> SimResult:
        requests = self.requests_in_arrival_order(arrivals)
        scheduler = self.scheduler
        instance = SimInstance(scheduler, self)
        steps = instance.steps
        now = 0.0
        nxt = 0
        finished = 0
        while nxt < len(requests) or scheduler.has_unfinished():
            while nxt < len(requests) and requests[nxt].arrival_time <= now:
                scheduler.add_request(requests[nxt])
                nxt += 1
            if not scheduler.has_unfinished():
                now = requests[nxt].arrival_time
                continue
            if not instance.start_step(now):
                if nxt < len(requests):
                    now = requests[nxt].arrival_time
                    continue
                raise SimulationStalled(
                    f"empty plan at t={now:.3f}s with {scheduler.num_running} running and "
                    f"{scheduler.num_waiting} waiting requests and no arrival left")
            now = instance.busy_until
            finished += len(instance.finish_step())
            if len(steps) >= self.max_steps:
                raise SimulationStalled(f"no end after {self.max_steps} steps")
            if self.on_progress is not None and len(steps) % 1000 == 0:
                self.on_progress(finished, len(requests))
        if self.on_progress is not None:
            self.on_progress(finished, len(requests))
        return SimResult(requests, steps, now)

    def requests_in_arrival_order(self, arrivals: Sequence[SimRequest]) -> list[Request]:
        order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i].arrival_s, i))
        kv = self.scheduler.kv
        page_size = kv.page_size if kv.enable_prefix_caching else None
        return [sim_request(i, arrivals[i], page_size) for i in order]


def sim_request(index: int, spec: SimRequest, page_size: int | None = None) -> Request:
    """The scheduler's Request for ``spec``; with ``page_size`` (prefix caching on), its
    page keys come from the trace's block hashes."""
    if spec.prompt_len <= 0 or spec.output_len <= 0:
        raise ValueError(f"request {index}: prompt_len and output_len must be positive, "
                         f"got {spec.prompt_len} and {spec.output_len}")
    request = Request(f"sim-{index}", [], SamplingParams(max_tokens=spec.output_len,
                                                         ignore_eos=True),
                      spec.arrival_s, prompt_len=spec.prompt_len,
                      ttft_slo=spec.ttft_slo, tpot_slo=spec.tpot_slo)
    if page_size is not None and spec.hash_ids:
        request.page_keys = BlockPageKeys(spec.hash_ids, spec.hash_block_size, page_size,
                                          spec.prompt_len)
    return request


class SimInstance:
    """One simulated instance's step mechanics: form a step at ``now`` (recording it),
    then finish it at ``busy_until``. The single-instance simulator and the cluster
    simulator (each of its instances) both step through this."""

    def __init__(self, scheduler: Scheduler, executor: Simulator) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.plan: StepPlan | None = None
        self.busy_until = math.inf
        self.steps: list[StepRecord] = []
        self._sampled: dict[str, int] = {}

    def start_step(self, now: float) -> bool:
        """Form and record the next step; False (nothing started) if the plan is empty."""
        scheduler = self.scheduler
        # Whether a prompt is waiting or partly done (a running num_remaining > 1) and
        # whether a running request can decode (num_remaining == 1), in one pass.
        waiting_prefill = bool(scheduler.waiting)
        waiting_decode = False
        for r in scheduler.running:
            remaining = r.prompt_len + len(r.output_token_ids) - r.num_computed_tokens
            if remaining == 1:
                waiting_decode = True
            elif remaining > 1:
                waiting_prefill = True
            if waiting_decode and waiting_prefill:
                break
        plan = scheduler.schedule(now)
        if plan.is_empty:
            return False
        features, self._sampled = _features_and_samples(plan.chunks)
        duration = self.executor.step_time(plan, features)
        self.steps.append(StepRecord(now, duration, plan.bucket, features.prefill_tokens,
                                     features.num_decodes, waiting_prefill, waiting_decode,
                                     len(plan.preempted)))
        self.plan = plan
        self.busy_until = now + duration
        return True

    def finish_step(self) -> list[Request]:
        """End the step in flight at ``busy_until``; returns the requests it finished."""
        plan, now = self.plan, self.busy_until
        self.plan, self.busy_until = None, math.inf
        return self.scheduler.on_step_done(plan, self._sampled, now)
