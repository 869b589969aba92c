"""Hand-built scheduler states shared by the policy tests."""

from __future__ import annotations

from fbjax.config import BucketConfig
from fbjax.sched.base import Scheduler, StepLimits, StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.request import Request, SamplingParams

PROMPT_TOKEN = 100  # every prompt token; never EOS or a stop id
OUT_TOKEN = 7  # an ordinary sampled token


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, *, eos=(),
                 stop_ids=(), ignore_eos: bool = False, arrival: float = 0.0) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_ids,
                              ignore_eos=ignore_eos)
    return Request(rid, [PROMPT_TOKEN] * prompt_len, sampling, arrival, eos_token_ids=eos)


def make_policy(cls: type[Scheduler], *, num_pages: int = 64, page_size: int = 4,
                max_tokens: int | None = None, max_seqs: int | None = None,
                token_buckets=(8, 16, 32), seq_buckets=(2, 4, 8)) -> Scheduler:
    buckets = BucketConfig(token_buckets=token_buckets, seq_buckets=seq_buckets)
    limits = StepLimits.from_buckets(buckets, max_tokens, max_seqs)
    return cls(limits, KVCacheManager(num_pages, page_size))


def put_running(sched: Scheduler, request: Request, *, computed: int,
                outputs: int = 0) -> Request:
    """Hand-build a running request: ``outputs`` sampled tokens, ``computed`` cached."""
    sched.add_request(request)
    for _ in range(outputs):
        request.append_output(OUT_TOKEN, 0.0)
    request.num_computed_tokens = computed
    assert sched.kv.ensure(request.request_id, computed)
    sched.admit(request, 0.0)
    return request


def chunks_of(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.num_tokens, c.start) for c in plan.chunks]


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def owned_pages(sched: Scheduler) -> dict[str, int]:
    return {k: len(v) for k, v in sched.kv._tables.items() if v}
