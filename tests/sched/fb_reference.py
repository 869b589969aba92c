"""FairBatching's step formation as first written: plain, one candidate at a time.

``FairBatchingScheduler.schedule`` inlines this for speed (deadlines, step features and
bucket picks computed in its loops, runs of relaxed decodes cleared by one prediction).
The property test in test_fairbatching_scheduler.py checks on random states that both
take the same decisions; change the two together.
"""

from __future__ import annotations

import heapq
import itertools
import math

from fbjax.sched.base import ScheduledChunk, StepPlan
from fbjax.sched.fairbatching import FairBatchingScheduler
from fbjax.sched.latency import StepFeatures
from fbjax.sched.request import Request, RequestStatus


class ReferenceFairBatching(FairBatchingScheduler):
    """The policy without the fast paths (the version before they were added)."""

    def schedule(self, now: float) -> StepPlan:
        decodes: list[Request] = []
        partial: list[Request] = []  # running prompts not yet fully prefilled
        for r in self.running:
            (decodes if r.num_remaining == 1 and r.num_output_tokens else partial).append(r)
        due = self.due
        # Each deadline computed once; the index breaks ties in queue order.
        by_due = sorted((due(r), i, r) for i, r in enumerate(decodes))
        waiting_index, key = self.prefill_order(partial, now)
        partial_by_due = sorted((key(r), i, r) for i, r in enumerate(partial))
        requests = self.requests
        waiting_by_due = [(d, i, requests[rid]) for d, i, rid in waiting_index]
        budget = self._budget(by_due[0][0], decodes, now) if decodes else math.inf
        if self.config.fair_formation:
            margin = self.config.urgency_margin
            urgent = [r for d, _, r in by_due if d - now < budget + margin * self.tpot_slo(r)]
            relaxed = [r for d, _, r in by_due if not d - now < budget + margin * self.tpot_slo(r)]
        else:
            urgent, relaxed = [r for _, _, r in by_due], []
        return self._ref_form(urgent, partial_by_due, waiting_by_due, relaxed,
                              budget - self.step_overhead_s if self.config.adaptive_capacity
                              else math.inf, now)

    def _ref_form(self, urgent: list[Request], partial: list, waiting: list,
              relaxed: list[Request], budget: float, now: float) -> StepPlan:
        """Add urgent decodes (always), then prefills (running and waiting, merged by
        deadline; each takes its largest chunk within budget, until one does not fit),
        then relaxed decodes that fit. ``partial``/``waiting`` are (due, i, request)."""
        # EDF: once a prefill does not fit, later ones wait; once the pool cannot hold
        # a waiting prompt (or the step preempted), no later one is admitted either.
        state = {"prefills_open": True, "admitting": True}

        def waiting_candidates():
            for item in waiting:
                if not state["admitting"]:
                    return
                yield item

        def prefill_candidates():
            for _, _, r in heapq.merge(partial, waiting_candidates(), key=lambda x: x[:2]):
                if not state["prefills_open"]:
                    return
                yield r, False

        order = itertools.chain(((r, True) for r in urgent), prefill_candidates(),
                                ((r, False) for r in relaxed))
        token_budget = self.limits.max_num_batched_tokens
        optional_tokens = self.step_tokens  # cap for prefills and relaxed decodes
        max_seqs = self.limits.max_num_seqs
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        feats = StepFeatures()
        seen: set[str] = set()  # a request preempted in this step must not come back in it

        for request, must_run in order:
            if len(chunks) >= max_seqs:
                break
            if request.request_id in seen or (preempted and request in preempted):
                continue
            seen.add(request.request_id)
            # As in every policy, a step that preempted admits nobody (the victim, now
            # first in line, must not be displaced by a newcomer), and admission is FCFS
            # within the deadline order: it stops at the first prompt the pool cannot hold.
            if request.status is RequestStatus.WAITING and (preempted or not state["admitting"]):
                state["admitting"] = False
                continue
            decode = request.num_remaining == 1 and request.num_output_tokens > 0
            start = request.num_computed_tokens
            if decode:
                num = 1
                if feats.num_tokens + 1 > (token_budget if must_run else optional_tokens):
                    continue
                if not must_run and not self._ref_fits(feats.with_chunk(1, start + 1, True),
                                                   budget):
                    continue
            else:
                num = self._ref_largest_chunk(feats, request, budget,
                                          min(optional_tokens, token_budget) - feats.num_tokens)
                if num == 0:
                    state["prefills_open"] = False
                    continue
            if request.status is RequestStatus.WAITING:
                if not self.kv.ensure(request.request_id, start + num):
                    state["admitting"] = False
                    continue
                self.admit(request, now)
            elif not self._allocate_or_preempt(request, num, preempted):
                continue
            chunks.append(ScheduledChunk(request, num, start))
            feats.add(num, start + num, decode)

        if preempted:  # a victim may have been scheduled before it was preempted
            chunks = [c for c in chunks if c.request.status is RequestStatus.RUNNING]
        if not chunks and self.has_unfinished():
            chunks = self._force_progress(now, preempted)
        return self.make_plan(chunks, preempted)

    def _ref_fits(self, feats: StepFeatures, budget: float) -> bool:
        if (feats.num_tokens > self.limits.max_num_batched_tokens
                or feats.num_seqs > self.limits.max_num_seqs):
            return False
        if math.isinf(budget):
            return True
        bucket = self.limits.buckets.pick(feats.num_tokens, feats.num_seqs)
        return self.latency.predict(bucket, feats) <= budget

    def _ref_largest_chunk(self, feats: StepFeatures, request: Request, budget: float,
                       room: int) -> int:
        """Largest chunk of ``request``'s prompt keeping the step within budget."""
        most = min(request.num_remaining, room)
        if most <= 0 or feats.num_seqs >= self.limits.max_num_seqs:
            return 0
        start = request.num_computed_tokens

        def fits(n: int) -> bool:
            return self._ref_fits(feats.with_chunk(n, start + n, False), budget)

        if fits(most):
            return most
        lo, hi = 0, most  # fits(lo) or lo == 0; not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        align = self.config.chunk_align
        return lo - lo % align if lo >= align else lo
