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

from fbjax.sched.base import ScheduledChunk, Scheduler, StepPlan
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
        for request in decodes + prefills:
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
            self.admit_waiting_fcfs(chunks, budget, now)
        return self.make_plan(chunks, preempted)
