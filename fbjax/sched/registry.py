"""Scheduler policies by name, so engine, simulator and CLIs build them the same way."""

from __future__ import annotations

from fbjax.engine.kv_cache import KVCacheManager
from fbjax.sched.base import Scheduler, StepLimits
from fbjax.sched.vllm import VLLMScheduler

POLICIES: dict[str, type[Scheduler]] = {"vllm": VLLMScheduler}


def make_scheduler(policy: str, limits: StepLimits, kv: KVCacheManager) -> Scheduler:
    try:
        cls = POLICIES[policy]
    except KeyError:
        raise ValueError(
            f"unknown scheduler {policy!r}; choose one of {sorted(POLICIES)}") from None
    return cls(limits, kv)
