"""Baseline: vLLM-v1-style chunked prefill.

Fixed token budget per step. Running requests go first in arrival order (decodes and
unfinished prefill chunks alike), then waiting requests FCFS; the last prompt that
does not fit whole is chunked. When pages run out, the lowest-priority running
request (the tail of the running list) is preempted for recompute, possibly the one
asking. No waiting request is admitted in a step that preempted, so a preempted
request is not immediately displaced by a newcomer.
"""

from __future__ import annotations

from fbjax.sched.base import ScheduledChunk, Scheduler, StepPlan
from fbjax.sched.request import Request


class VLLMScheduler(Scheduler):
    name = "vllm"

    def schedule(self, now: float) -> StepPlan:
        budget = self.limits.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []

        running = self.running
        max_seqs = self.limits.max_num_seqs
        allocate = self._allocate_or_preempt
        index = 0
        while index < len(running) and budget > 0:
            if len(chunks) >= max_seqs:
                break
            request = running[index]
            start = request.num_computed_tokens
            num = request.prompt_len + len(request.output_token_ids) - start  # num_remaining
            if num > budget:
                num = budget
            if not allocate(request, num, preempted):
                break
            chunks.append(ScheduledChunk(request, num, start))
            budget -= num
            index += 1

        if not preempted:
            self.admit_waiting_fcfs(chunks, budget, now)
        return self.make_plan(chunks, preempted)
