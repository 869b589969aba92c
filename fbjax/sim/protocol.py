"""The evaluation protocol (docs/architecture.md) in one place: which slice of a trace, which SLOs.

SLOs are multiples of the profile's unloaded latencies (DistServe / Sarathi-Serve
practice), computed without bucket padding (``unpadded_step_s``), in three kinds:

* ``uniform`` (the paper's): one TTFT SLO for every request, k x the unloaded prefill of
  the trace's median prompt; TPOT is k' x one decode step at median context;
* proportional (settings named plain ``strict`` / ``relaxed``): a request's TTFT SLO is
  k x its own prefill alone, floored at the uniform one (a 100K-token prompt is not
  judged by a 1K one's bound);
* ``stall``: proportional, and each request's P99 time between tokens within k' x the
  unloaded decode step (Sarathi-Serve's token-stall view).

Strict is k = 10, k' = 4; relaxed k = 25, k' = 8. Sarathi
"as deployed" uses the largest bucket whose worst-case step meets the TPOT SLO at the
trace's p90 prompt. The scheduler and cluster benchmarks and the reproduction report
all build their settings here, so their figures are comparable.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math

import numpy as np

from fbjax.metrics import capacity_search
from fbjax.profiling.store import Profile
from fbjax.sched.fairbatching import FairBatchingConfig
from fbjax.sched.latency import StepFeatures
from fbjax.sim.experiment import SLO, sim_requests
from fbjax.sim.instance import (
    PolicySpec,
    deployed_chunk_size,
    fastest_unloaded_prefill_s,
    unloaded_decode_s,
    unloaded_prefill_s,
)
from fbjax.traces import Trace, TraceError, load_trace

# (TTFT multiple, TPOT multiple) of the unloaded latencies.
SLO_LEVELS = {"strict": (10.0, 4.0), "relaxed": (25.0, 8.0)}
SLO_KINDS = ("proportional", "uniform", "stall")
# Setting name -> (kind, level): "strict", "uniform-strict", "stall-strict", ...
SLO_SETTINGS = {(level if kind == "proportional" else f"{kind}-{level}"): (kind, level)
                for kind in SLO_KINDS for level in SLO_LEVELS}
# The Sarathi oracle is the hindsight-best fixed budget on this ladder: every token
# bucket of the GPU profiles from 128 to 4096, so no budget pads to a larger step.
ORACLE_BUDGETS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# A coarser ladder for smoke runs (``--quick`` studies), where the search cost matters
# more than the last few percent of the oracle's capacity.
COARSE_ORACLE_BUDGETS = (256, 512, 1024, 2048)
# vLLM's own defaults for its OpenAI server (vllm/engine/arg_utils.py,
# EngineArgs.get_batch_defaults, UsageContext.OPENAI_API_SERVER): max_num_batched_tokens
# 8192 and max_num_seqs 1024 on GPUs of >= 70 GiB other than the A100 (H100, H200,
# MI300X), else 2048 and 256.
VLLM_DEFAULTS_LARGE_GPU = (8192, 1024)
VLLM_DEFAULTS = (2048, 256)
LARGE_GPUS = ("h100", "h200", "mi300")
# A length-only trace (no timestamps) gets Poisson arrivals at this base rate; the
# experiments then scale the rate as for any trace.
LENGTHS_ONLY_RATE = 1.0
# Mooncake's timestamps are quantized to ~3 s buckets; spread each bucket over its
# width as its README advises (else rate scaling keeps every burst intact).
MOONCAKE_JITTER_S = 3.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """One (trace, SLO setting) cell of an experiment."""

    name: str
    slo: SLO
    unloaded_ttft_s: float  # of the trace's median prompt
    unloaded_tpot_s: float  # at its median context
    deployed_budget: int  # Sarathi as deployed
    vllm_defaults: tuple[int, int] = VLLM_DEFAULTS  # (token budget, max seqs) on its device

    def describe(self) -> str:
        return (f"{self.name}: {self.slo.describe()} (unloaded TTFT "
                f"{self.unloaded_ttft_s * 1e3:.0f} ms, TPOT {self.unloaded_tpot_s * 1e3:.1f} "
                f"ms); Sarathi deployed budget {self.deployed_budget}")


def protocol_trace(name: str, duration_s: float | None = None) -> Trace:
    """The trace by name, Mooncake jittered, cut to its first ``duration_s`` seconds.
    ``<name>@gamma<shape>`` is that trace's requests with Gamma inter-arrivals of that
    shape at the slice's mean rate (``Trace.with_gamma_arrivals``, seed 0): the same
    requests as the plain slice, under arrivals no trace had."""
    name, _, arrivals = name.partition("@")
    if arrivals:
        if not arrivals.startswith("gamma"):
            raise ValueError(f"unknown arrivals {arrivals!r} in trace name; use "
                             f"<trace>@gamma<shape>, e.g. {name}@gamma0.25")
        try:
            shape = float(arrivals.removeprefix("gamma"))
        except ValueError:
            raise ValueError(f"bad Gamma shape in {arrivals!r}; e.g. gamma0.25") from None
        return protocol_trace(name, duration_s).with_gamma_arrivals(shape)
    jitter = {"jitter_s": MOONCAKE_JITTER_S} if name.startswith("mooncake") else {}
    try:
        trace = load_trace(name, **jitter)
    except TraceError as e:
        if "length-only" not in str(e):
            raise
        trace = load_trace(name, rate=LENGTHS_ONLY_RATE)
    return trace.sliced(0, duration_s) if duration_s else trace


def unloaded_latencies(profile: Profile, trace: Trace) -> tuple[float, float]:
    """Unloaded TTFT of the trace's median prompt and TPOT at its median context."""
    prompt = int(np.median(trace.prompt_lens))
    context = int(np.median(trace.prompt_lens) + np.median(trace.output_lens) / 2)
    return (unloaded_prefill_s(profile.latency, profile.buckets, prompt, padded=False),
            unloaded_decode_s(profile.latency, profile.buckets, context))


def unloaded_ttft_floor(profile: Profile, trace: Trace, percentile: float = 99.0) -> float:
    """The ``percentile`` of the trace's TTFTs if every request ran alone, each in its
    fastest equal-chunk prefill (``fastest_unloaded_prefill_s``): a scheduler's TTFT
    percentile can hardly go below it, so a baseline's P99 TTFT over this floor bounds
    the P99 reduction a policy can show on the trace. Over the requests the simulator
    serves (``sim_requests`` drops those larger than the KV pool)."""
    served, _ = sim_requests(trace, SLO(1.0, 1.0), profile)
    fastest = functools.lru_cache(maxsize=None)(
        lambda n: fastest_unloaded_prefill_s(profile.latency, profile.buckets, n))
    times = [fastest(r.prompt_len) for r in served]
    return float(np.percentile(times, percentile)) if times else 0.0


# Orders the ideal instance may serve prompts in: arrival, shortest prompt, deadline.
IDEAL_ORDERS = ("fcfs", "shortest", "deadline")


def ideal_ttfts(profile: Profile, trace: Trace, slo: SLO, rate_scale: float = 1.0,
                order: str = "deadline") -> tuple[np.ndarray, np.ndarray]:
    """First-token times (after arrival) and TTFT SLOs of the requests on an idealized
    instance: every prompt token costs the profile's best per-token prefill time (the
    most efficient bucket, no attention), steps pack prompts perfectly, decodes are
    free, and prefill is preempted at will in ``order`` (one of ``IDEAL_ORDERS``). No
    policy on the real step mechanism should beat it, so it shows what a trace's bursts
    leave to win at all."""
    if order not in IDEAL_ORDERS:
        raise ValueError(f"order must be one of {IDEAL_ORDERS}, got {order!r}")
    served, _ = sim_requests(trace.scaled(rate_scale), slo, profile)
    per_token = min(
        profile.latency.predict(profile.buckets.pick(n, 1),
                                StepFeatures.of_chunks([(n, n, False)])) / n
        for n in profile.buckets.token_buckets)
    jobs = [(r.arrival_s, r.prompt_len * per_token, r.ttft_slo) for r in served]
    rank = {"fcfs": lambda j: j[0], "shortest": lambda j: j[1],
            "deadline": lambda j: j[0] + j[2]}[order]
    ttfts = np.zeros(len(jobs))
    now, i, ready = 0.0, 0, []  # ready: (rank, index, work left)
    while i < len(jobs) or ready:
        if not ready:
            now = max(now, jobs[i][0])
        while i < len(jobs) and jobs[i][0] <= now:
            heapq.heappush(ready, (rank(jobs[i]), i, jobs[i][1]))
            i += 1
        key, j, work = heapq.heappop(ready)
        next_arrival = jobs[i][0] if i < len(jobs) else math.inf
        if now + work <= next_arrival:
            now += work
            ttfts[j] = now - jobs[j][0]
        else:  # runs until the next arrival, which may take over
            heapq.heappush(ready, (key, j, work - (next_arrival - now)))
            now = next_arrival
    return ttfts, np.array([j[2] for j in jobs])


def ideal_capacity(profile: Profile, trace: Trace, slo: SLO, *, target: float = 0.99,
                   tol: float = 0.01) -> float:
    """Capacity (rate scale with ``target`` of first tokens within their TTFT SLOs) of
    the idealized instance of ``ideal_ttfts``, in deadline order: a goal of ``g`` x a
    baseline's capacity above it is out of reach. An estimate, not a proof: EDF is
    optimal when every deadline can be met, not for the most deadlines met."""
    def attainment(scale: float) -> float:
        ttfts, slos = ideal_ttfts(profile, trace, slo, scale)
        return float(np.mean(ttfts <= slos)) if len(ttfts) else 1.0

    return capacity_search(attainment, target=target, lo=0.05, hi=1.0, tol=tol).rate_scale


def ideal_ttft_percentile(profile: Profile, trace: Trace, slo: SLO, rate_scale: float,
                          percentile: float = 99.0) -> tuple[float, str]:
    """The lowest ``percentile`` TTFT of the idealized instance (``ideal_ttfts``) over
    its orders, and that order: at a given load, a baseline's percentile over this
    bounds the reduction a policy can show (an estimate: the best order for a
    percentile need not be among these three)."""
    best = (math.inf, IDEAL_ORDERS[0])
    for order in IDEAL_ORDERS:  # ties: the first in IDEAL_ORDERS
        ttfts, _ = ideal_ttfts(profile, trace, slo, rate_scale, order)
        if not len(ttfts):  # nothing the instance could serve
            return 0.0, order
        value = float(np.percentile(ttfts, percentile))
        if value < best[0]:
            best = (value, order)
    return best


def setting_for(name: str, profile: Profile, trace: Trace) -> Setting:
    if name not in SLO_SETTINGS:
        raise ValueError(f"unknown SLO setting {name!r}; choose one of {list(SLO_SETTINGS)}")
    kind, level = SLO_SETTINGS[name]
    k_ttft, k_tpot = SLO_LEVELS[level]
    ttft0, tpot0 = unloaded_latencies(profile, trace)
    slo = SLO(k_ttft * ttft0, k_tpot * tpot0,
              ttft_prefill_multiple=None if kind == "uniform" else k_ttft,
              tbt_s=k_tpot * tpot0 if kind == "stall" else None)
    context = int(np.percentile(trace.prompt_lens, 90))
    deployed = deployed_chunk_size(profile.latency, profile.buckets, slo.tpot_s, context)
    return Setting(name, slo, ttft0, tpot0, deployed, vllm_defaults(profile))


def vllm_defaults(profile: Profile) -> tuple[int, int]:
    """vLLM's default (max_num_batched_tokens, max_num_seqs) on the profile's device."""
    device = str(profile.latency.metadata.get("device", "")).lower()
    return VLLM_DEFAULTS_LARGE_GPU if device.startswith(LARGE_GPUS) else VLLM_DEFAULTS


def policy_specs(setting: Setting, *, oracle: bool = True, ablations: bool = True,
                 oracle_budgets: tuple[int, ...] = ORACLE_BUDGETS) -> list[PolicySpec]:
    """The rows every experiment compares: Sarathi as deployed (first), the Sarathi
    oracle's other budgets, vLLM-style chunked prefill, FairBatching, and its ablations
    (without adaptive capacity, without fair formation, envelope anchored at arrival,
    without the decode stall cap, EDF order only, late prompts kept in deadline order).
    vLLM runs with its own defaults for the profile's device (``vllm_defaults``)."""
    slo, deployed = setting.slo, setting.deployed_budget
    # Under a token-stall SLO no decode may wait longer than it: FairBatching's stall cap
    # is that bound (its banked slack would otherwise spend it).
    fb = FairBatchingConfig(ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s,
                            max_decode_stall_s=slo.tbt_s)
    out = [PolicySpec("sarathi", token_budget=deployed, label=f"sarathi-deployed({deployed})")]
    if oracle:
        out += [PolicySpec("sarathi", token_budget=b, label=f"sarathi-{b}")
                for b in oracle_budgets if b != deployed]
    budget, seqs = setting.vllm_defaults
    out += [PolicySpec("vllm", token_budget=budget, max_seqs=seqs, label=vllm_label(setting)),
            PolicySpec("fairbatching", fairbatching=fb, label="fairbatching")]
    if ablations:
        out += [
            PolicySpec("fairbatching", token_budget=deployed, label="fb-no-adaptive-capacity",
                       fairbatching=dataclasses.replace(fb, adaptive_capacity=False)),
            PolicySpec("fairbatching", label="fb-no-fair-formation",
                       fairbatching=dataclasses.replace(fb, fair_formation=False)),
            PolicySpec("fairbatching", label="fb-anchor-arrival",
                       fairbatching=dataclasses.replace(fb, anchor="arrival")),
            PolicySpec("fairbatching", label="fb-no-stall-cap",
                       fairbatching=dataclasses.replace(fb, max_decode_stall_tpots=None)),
            PolicySpec("fairbatching", label="fb-edf-only",
                       fairbatching=dataclasses.replace(fb, fcfs_headroom=None)),
            PolicySpec("fairbatching", label="fb-late-prompts-in-place",
                       fairbatching=dataclasses.replace(fb, second_deadline_when_late=False)),
        ]
    return out


def vllm_label(setting: Setting) -> str:
    return f"vllm-default({setting.vllm_defaults[0]})"


def sarathi_edf_spec(setting: Setting, budget: int) -> PolicySpec:
    """Sarathi with prompts in TTFT-deadline order at ``budget`` (the oracle's): how much
    of FairBatching's gain deadline order alone buys, apart from its step formation."""
    return PolicySpec("sarathi-edf", token_budget=budget, label=f"sarathi-edf-{budget}",
                      ttft_slo_s=setting.slo.ttft_s)
