"""Baseline: Sarathi-Serve stall-free batching (Agrawal et al., OSDI'24).

A fixed token budget per step (``chunk_size``, default 512; at most 128 sequences).
Every running decode takes its one token first, so decodes never stall behind a
prompt; then ongoing (partially prefilled) prompts continue; then new prompts are
admitted first-come-first-served, each chunked to ``min(remaining, budget left)``.
Admission stops at the first waiting request that does not fit (FCFS, no skipping).
When KV pages run out, the tail of the running list is preempted for recompute and
nothing new is admitted that step.

The budget is chosen offline per deployment ("as deployed": the largest bucket whose
worst-case step time still meets the TPOT SLO, see ``deployed_chunk_size``).
"""

from __future__ import annotations

import bisect
import itertools

from fbjax.sched.base import ScheduledChunk, Scheduler, StepLimits, StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.request import Request, RequestStatus

DEFAULT_CHUNK_SIZE = 512
DEFAULT_MAX_SEQS = 128


class SarathiScheduler(Scheduler):
    name = "sarathi"

    def schedule(self, now: float) -> StepPlan:
        budget = self.limits.max_num_batched_tokens
        max_seqs = self.limits.max_num_seqs
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []

        decodes: list[Request] = []
        prefills: list[Request] = []
        for r in self.running:  # r.num_remaining == 1 and r.num_output_tokens, inlined
            outputs = len(r.output_token_ids)
            if outputs and r.prompt_len + outputs - r.num_computed_tokens == 1:
                decodes.append(r)
            else:
                prefills.append(r)
        running = RequestStatus.RUNNING
        allocate = self._allocate_or_preempt
        for request in decodes + self.order_prefills(prefills):
            if budget <= 0 or len(chunks) >= max_seqs:
                break
            if request.status is not running:
                continue  # preempted earlier in this loop
            start = request.num_computed_tokens
            num = request.prompt_len + len(request.output_token_ids) - start
            if num > budget:
                num = budget
            if not allocate(request, num, preempted):
                continue
            chunks.append(ScheduledChunk(request, num, start))
            budget -= num
        if not preempted:
            self.admit_waiting(chunks, budget, now)
        return self.make_plan(chunks, preempted)

    def order_prefills(self, prefills: list[Request]) -> list[Request]:
        """Running prompts in the order they continue (Sarathi: the running order)."""
        return prefills

    def admit_waiting(self, chunks: list[ScheduledChunk], budget: int, now: float) -> None:
        self.admit_waiting_fcfs(chunks, budget, now)


class SarathiEDFScheduler(SarathiScheduler):
    """Sarathi-Serve with deadline-ordered admission: the same fixed budget, decodes
    first, chunking and head-of-line rule, but prompts (running and waiting) go by TTFT
    deadline (arrival + the request's TTFT SLO, else ``ttft_slo_s``) instead of
    arrival. It is the baseline that tells how much of FairBatching's gain is EDF alone
    and how much its own step formation: with one TTFT SLO for all, the order is FCFS
    and this is Sarathi; with prompt-proportional SLOs, short prompts overtake."""

    name = "sarathi-edf"

    def __init__(self, limits: StepLimits, kv: KVCacheManager, ttft_slo_s: float) -> None:
        super().__init__(limits, kv)
        self.ttft_slo_s = ttft_slo_s
        # Waiting requests by deadline, kept sorted as they come and go (a deadline
        # cannot change while a request waits).
        self._by_deadline: list[tuple[float, int, str]] = []
        self._keys: dict[str, tuple[float, int, str]] = {}
        self._arrivals = itertools.count()

    def deadline(self, request: Request) -> float:
        slo = request.ttft_slo if request.ttft_slo is not None else self.ttft_slo_s
        return request.arrival_time + slo

    def _waiting_added(self, request: Request) -> None:
        key = (self.deadline(request), next(self._arrivals), request.request_id)
        bisect.insort(self._by_deadline, key)
        self._keys[request.request_id] = key

    def _waiting_removed(self, request: Request) -> None:
        key = self._keys.pop(request.request_id)
        del self._by_deadline[bisect.bisect_left(self._by_deadline, key)]

    def order_prefills(self, prefills: list[Request]) -> list[Request]:
        return sorted(prefills, key=self.deadline)  # stable: ties keep running order

    def admit_waiting(self, chunks: list[ScheduledChunk], budget: int, now: float) -> None:
        by_deadline, requests = self._by_deadline, self.requests
        self.admit_in_order(chunks, budget, now,
                            lambda: requests[by_deadline[0][2]] if by_deadline else None)
