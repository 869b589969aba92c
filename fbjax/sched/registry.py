"""Scheduler policies by name, so engine, simulator and CLIs build them the same way."""

from __future__ import annotations

from fbjax.config import SchedulerConfig
from fbjax.sched.base import Scheduler, StepLimits
from fbjax.sched.fairbatching import FairBatchingConfig, FairBatchingScheduler
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.latency import LatencyModel
from fbjax.sched.sarathi import SarathiEDFScheduler, SarathiScheduler
from fbjax.sched.vllm import VLLMScheduler

POLICIES = ("vllm", "sarathi", "sarathi-edf", "fairbatching")
# Policies that cannot run without a latency model (the others may refine one).
NEEDS_LATENCY_MODEL = frozenset({"fairbatching"})


def needs_latency_model(policy: str) -> bool:
    """Whether ``policy`` needs a latency profile to schedule at all."""
    return policy in NEEDS_LATENCY_MODEL


def make_scheduler(policy: str, limits: StepLimits, kv: KVCacheManager, *,
                   latency: LatencyModel | None = None,
                   fairbatching: FairBatchingConfig | None = None,
                   ttft_slo_s: float | None = None) -> Scheduler:
    """Build the named policy; FairBatching needs a latency model; Sarathi-EDF orders
    prompts by TTFT deadline, ``ttft_slo_s`` for requests without an SLO of their own
    (default: FairBatching's)."""
    if policy == "vllm":
        return VLLMScheduler(limits, kv)
    if policy == "sarathi":
        return SarathiScheduler(limits, kv)
    if policy == "sarathi-edf":
        if ttft_slo_s is None:
            ttft_slo_s = (fairbatching or FairBatchingConfig()).ttft_slo_s
        return SarathiEDFScheduler(limits, kv, ttft_slo_s)
    if policy == "fairbatching":
        if latency is None:
            raise ValueError("the fairbatching scheduler needs a latency profile "
                             "(a LatencyModel, e.g. from --profile)")
        return FairBatchingScheduler(limits, kv, latency, fairbatching)
    raise ValueError(f"unknown scheduler {policy!r}; choose one of {list(POLICIES)}")


def scheduler_from_config(config: SchedulerConfig, limits: StepLimits, kv: KVCacheManager,
                          latency: LatencyModel | None = None) -> Scheduler:
    """The scheduler an engine's :class:`SchedulerConfig` describes; its SLO defaults
    and envelope anchor go to the policies that use them."""
    return make_scheduler(
        config.policy, limits, kv, latency=latency,
        fairbatching=FairBatchingConfig(ttft_slo_s=config.ttft_slo_s,
                                        tpot_slo_s=config.tpot_slo_s, anchor=config.anchor),
        ttft_slo_s=config.ttft_slo_s)
