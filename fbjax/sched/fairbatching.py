"""FairBatching (Lyu et al., arXiv 2510.14392): fair, adaptive batch formation.

Three ideas, each switchable for ablation:

1. **Deadline envelope, not TBT.** Output token ``j`` of a request is due at
   ``arrival + ttft_slo`` for ``j = 0`` and, for ``j >= 1``, at
   ``first_token_time + j * tpot_slo`` (``anchor="first_token"``, the default) or
   ``arrival + ttft_slo + j * tpot_slo`` (``anchor="arrival"``, the paper's).
   The envelope is monotonic: a request that ran ahead has banked slack it can lend
   out. We default to the first-token anchor because an arrival anchor lets TTFT
   slack leak into TPOT and breaks the vLLM-view TPOT SLO (docs/architecture.md,
   "Metrics"). ``max_decode_stall_tpots`` (default 3 TPOT SLOs) and
   ``max_decode_stall_s`` cap how long a decode may be skipped between two tokens,
   whatever its banked slack.
2. **Adaptive capacity** (``adaptive_capacity``): each step gets a *time* budget
   ``max(min over running decodes of slack, min tpot_slo)``: as large as possible
   without making the most urgent decode late, never below one TPOT. The latency
   model turns time into tokens. Without running decodes the step is bounded by the
   largest bucket only. Off: a fixed token budget, like Sarathi.
3. **Fair formation** (``fair_formation``): candidates in three groups: decodes that
   cannot wait for another step (slack below budget + ``urgency_margin`` TPOTs), then
   prefills by TTFT deadline (each takes the largest chunk that keeps the predicted
   step time within budget), then decodes with slack to spare. A decode ahead of its
   envelope thus yields its compute to a prefill burst; under uniform pressure every
   decode is urgent and the order degrades to decode-first. Off: decode-first.

**Prefill order.** Prompts are served first-come-first-served while the queued ones
could all finish well before the earliest prefill deadline (``fcfs_headroom``), and by
deadline (EDF) once one is at stake. EDF is what keeps deadlines under a burst, but with
TTFT SLOs that grow with the prompt it lets every short prompt that arrives pass a long
one, and the absolute TTFT tail, made of the longest prompts, grows for nothing when no
deadline was at risk. Under EDF a prompt that can no longer make its deadline, even
prefilled alone from now on, gets a second deadline one TTFT SLO later
(``second_deadline_when_late``): in a burst EDF would otherwise spend the next steps on a lost
cause and make the prompts behind it late as well.

**Forward progress.** If nothing fits the budget (e.g. an SLO tighter than the
hardware), the most urgent candidate runs anyway with a minimal chunk, so a state
with work never yields an empty step.

**Load estimate** (``load_estimate``): the Prefill Admission Budget, in prompt
tokens, that a router can still send within the TTFT SLO; see its docstring.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

from fbjax.sched.base import ScheduledChunk, Scheduler, StepLimits, StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.latency import LatencyModel, StepFeatures
from fbjax.sched.request import Request, RequestStatus

ANCHORS = ("first_token", "arrival")


class _Decodes(NamedTuple):
    """The running decodes of one step, in queue order (``_running_by_kind``)."""

    dues: list[float]  # when each one's next token is due (``due()``)
    chunks: list[ScheduledChunk]  # each one's one-token chunk
    needs_page: list[int]  # indices of those whose token needs another KV page
    in_order: bool  # their deadlines never fall in queue order
    tpot: float | None  # the TPOT SLO they all have, None if they differ


@dataclasses.dataclass(frozen=True)
class FairBatchingConfig:
    """Free constants of the policy, each with the reason for its default."""

    # Defaults for requests that carry no SLO of their own (the first prototype's).
    ttft_slo_s: float = 3.0
    tpot_slo_s: float = 0.1
    anchor: str = "first_token"
    # A decode is urgent when its slack is below budget + margin * its TPOT: it could
    # not absorb one more step of TPOT length after this one. One TPOT is the
    # smallest margin that survives a latency-model error of a full step.
    urgency_margin: float = 1.0
    max_decode_stall_s: float | None = None
    # The same cap as a multiple of each request's own TPOT SLO (both apply if set).
    # Banked slack alone let a decode sit out 2.4-39 s behind a prefill surge (azure
    # conv and code, mooncake conversation, strict and relaxed SLOs, A100 Llama-3-8B
    # profile, at and above FairBatching's capacity). Capped at 3 TPOTs, SLO
    # attainment was equal or higher at 11 of those 12 points (conv relaxed, 600 s:
    # 100% vs 99.4% at capacity, 32.1% vs 29.9% past it; the twelfth lost one request
    # of 781) and the longest stall fell to 0.14-0.3 s (4 s in mooncake overload, from
    # 39 s). 2 TPOTs gave back fair formation's gain on conv relaxed (96.1%, as with
    # decode-first); 5 and 8 kept less of it than 3.
    max_decode_stall_tpots: float | None = 3.0
    # Partial prefill chunks are rounded down to this many tokens, so a prompt is not
    # cut into slivers that cost a whole step each; 16 is the smallest token bucket.
    chunk_align: int = 16
    # Horizon of the load estimate; None means the default TTFT SLO.
    load_horizon_s: float | None = None
    # Optional work (prefill chunks, relaxed decodes) fills a step only up to this many
    # tokens; None picks the latency curve's knee: the smallest token bucket whose
    # prefill cost per token is within ``knee_tolerance`` of the best bucket's. Past
    # the knee a bigger step buys no throughput (on an A100 with Llama-3-8B the cost
    # per token is flat from 512 to 3072 tokens) and only delays every first token in
    # it, so "as large as the time budget allows" would hurt TTFT for nothing. Urgent
    # decodes are never held back by this cap.
    step_tokens: int | None = None
    knee_tolerance: float = 0.05
    adaptive_capacity: bool = True
    fair_formation: bool = True
    # Prefills go FCFS (by arrival, or by their own deadline if it is earlier than the
    # default TTFT SLO's) while the queued prompts, each prefilled alone in knee-sized
    # chunks, take at most 1 / fcfs_headroom of the time to the earliest deadline; EDF
    # otherwise (None: always EDF). While it holds, every queued prompt finishes in
    # time in any order even if decodes take half of each step: EDF would buy nothing. A100
    # Llama-3-8B profile, first 300 s, at Sarathi-deployed's capacity, P99 TTFT with
    # always-EDF / headroom 1 / 2 / 4: azure conv strict 765 / 656 / 673 / 689 ms, conv
    # relaxed 2513 / 1815 / 1741 / 2158 ms, code relaxed 2776 / 2257 / 2282 / 2617 ms;
    # P50 rises the more FCFS is used (conv relaxed 139 / 262 / 241 / 188 ms, Sarathi's
    # 326). Capacity stayed EDF's at 2 on those traces and on mooncake conversation
    # (scripts/bench_schedulers.py, row fb-edf-only) but not on mooncake synthetic
    # (Poisson arrivals): 0.110 vs 0.114 (0.110 at 3, 0.113 at 4). The price of FCFS:
    # it spends slack that EDF banks, by leaving long prompts for later, for the next
    # burst. FCFS at all times lost 20% (conv strict 0.97 vs 1.22).
    fcfs_headroom: float | None = 2.0
    # Under EDF, a waiting prompt that would miss its TTFT deadline even if prefilled
    # alone from now on gets a second deadline one TTFT SLO later (``_demote_late``): EDF
    # would give it the next steps and make the prompts behind it late too, the domino
    # effect of EDF in overload. It is served, never dropped, and waits a bounded time.
    # A100 Llama-3-8B profile, azure conv, first 300 s, one TTFT SLO for all
    # (uniform-strict): capacity 1.043 with it, 0.852 without (Sarathi oracle 0.807);
    # 1.057 with late prompts last (unbounded wait); unchanged (1.193, 1.207) under
    # proportional and token-stall SLOs. Its price: late prompts wait longer.
    second_deadline_when_late: bool = True

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0:
            raise ValueError("SLOs must be positive")
        if self.max_decode_stall_s is not None and self.max_decode_stall_s <= 0:
            raise ValueError("max_decode_stall_s must be positive")
        if self.max_decode_stall_tpots is not None and self.max_decode_stall_tpots <= 0:
            raise ValueError("max_decode_stall_tpots must be positive")
        if self.fcfs_headroom is not None and self.fcfs_headroom <= 0:
            raise ValueError("fcfs_headroom must be positive")


class FairBatchingScheduler(Scheduler):
    name = "fairbatching"

    def __init__(self, limits: StepLimits, kv: KVCacheManager, latency: LatencyModel,
                 config: FairBatchingConfig | None = None) -> None:
        super().__init__(limits, kv)
        self.latency = latency
        self.config = config or FairBatchingConfig()
        missing = [b for b in limits.buckets.pairs() if b not in latency.coefficients]
        if missing:
            raise ValueError(f"latency model lacks buckets {missing[:4]}"
                             f"{'...' if len(missing) > 4 else ''}; profile this bucket set")
        self.step_tokens = min(self.config.step_tokens or self.knee_tokens(),
                               limits.max_num_batched_tokens)
        # Non-negative coefficients make predictions monotone in every feature
        # (LatencyModel's contract); _form then clears relaxed decodes in runs.
        self._monotone_latency = all(float(min(c)) >= 0 for c in latency.coefficients.values())
        # Waiting requests sorted by deadline and in FCFS order (``fcfs_key``), kept up
        # to date as they come and go: neither key can change while a request waits, and
        # with a thousand queued prompts re-sorting them every step would dominate its
        # cost. Their prefill work is summed for the choice between the two orders.
        self._waiting_by_due: list[tuple[float, int, str]] = []
        self._waiting_by_arrival: list[tuple[float, int, str]] = []
        self._waiting_keys: dict[str, tuple[tuple[float, int, str],
                                            tuple[float, int, str], float]] = {}
        self._waiting_work = 0.0  # their prefill_time(), summed
        self.num_late_prompts = 0  # waiting prompts given a second deadline (``_demote_late``)
        self._late_ids: set[str] = set()
        self._arrivals = itertools.count()
        # prefill_time(n) = linear * n + quadratic * n**2, exact at multiples of the knee.
        knee = self.step_tokens
        one, two = (sum(latency.predict(limits.buckets.pick(knee, 1),
                                        StepFeatures.of_chunks([(knee, (i + 1) * knee, False)]))
                        for i in range(k)) for k in (1, 2))
        # Clamped: a model whose later chunks cost less would make a long queue free.
        self._prefill_quadratic = max(0.0, (two - 2 * one) / (2 * knee * knee))
        self._prefill_linear = one / knee - self._prefill_quadratic * knee

    def prefill_time(self, tokens: int) -> float:
        """Predicted time to prefill ``tokens`` prompt tokens alone in knee-sized chunks:
        the latency model is linear in each step's work, and chunk after chunk the
        attention work grows with the prefix, so the sum is quadratic in ``tokens``
        (exact at multiples of the knee). The queue's prefill work in prefill_order()."""
        return (self._prefill_linear + self._prefill_quadratic * tokens) * tokens

    def _waiting_added(self, request: Request) -> None:
        number, rid = next(self._arrivals), request.request_id
        by_due = (self.due(request), number, rid)
        by_arrival = (self.fcfs_key(request), number, rid)
        bisect.insort(self._waiting_by_due, by_due)
        bisect.insort(self._waiting_by_arrival, by_arrival)
        work = self.prefill_time(request.num_tokens)
        self._waiting_keys[rid] = (by_due, by_arrival, work)
        self._waiting_work += work

    def _waiting_removed(self, request: Request) -> None:
        by_due, by_arrival, work = self._waiting_keys.pop(request.request_id)
        self._late_ids.discard(request.request_id)
        del self._waiting_by_due[bisect.bisect_left(self._waiting_by_due, by_due)]
        del self._waiting_by_arrival[bisect.bisect_left(self._waiting_by_arrival, by_arrival)]
        # Back to exactly zero when the queue empties, whatever the rounding on the way.
        self._waiting_work = self._waiting_work - work if self._waiting_keys else 0.0

    def knee_tokens(self, context: int = 1024) -> int:
        """Smallest token bucket whose per-token prefill time (one chunk after a
        ``context``-token prefix) is within ``knee_tolerance`` of the best bucket's."""
        buckets = self.limits.buckets
        per_token = {}
        for tokens in buckets.token_buckets:
            if tokens > self.limits.max_num_batched_tokens:
                break
            feats = StepFeatures.of_chunks([(tokens, context + tokens, False)])
            per_token[tokens] = self.latency.predict(buckets.pick(tokens, 1), feats) / tokens
        if not per_token:  # the token budget is below the smallest bucket
            return self.limits.max_num_batched_tokens
        best = min(per_token.values())
        return min(t for t, c in per_token.items() if c <= best * (1 + self.config.knee_tolerance))

    # ----- deadlines ------------------------------------------------------------------
    def ttft_slo(self, request: Request) -> float:
        return request.ttft_slo if request.ttft_slo is not None else self.config.ttft_slo_s

    def tpot_slo(self, request: Request) -> float:
        return request.tpot_slo if request.tpot_slo is not None else self.config.tpot_slo_s

    def due(self, request: Request) -> float:
        """When the request's next output token is due under its envelope."""
        j = request.num_output_tokens
        if j == 0:
            return request.arrival_time + self.ttft_slo(request)
        if self.config.anchor == "arrival":
            due = request.arrival_time + self.ttft_slo(request) + j * self.tpot_slo(request)
        else:
            due = request.token_times[0] + j * self.tpot_slo(request)
        if self.config.max_decode_stall_s is not None:
            due = min(due, request.token_times[-1] + self.config.max_decode_stall_s)
        if self.config.max_decode_stall_tpots is not None:
            due = min(due, request.token_times[-1]
                      + self.config.max_decode_stall_tpots * self.tpot_slo(request))
        return due

    def fcfs_key(self, request: Request) -> float:
        """A prompt's place in FCFS order: its arrival, shifted by the default TTFT SLO
        so that one whose own deadline is earlier keeps that place instead (a request
        with tokens out, preempted and recomputed, goes by its next token's deadline)."""
        due = self.due(request)
        if request.num_output_tokens:
            return due
        key = request.arrival_time + self.config.ttft_slo_s
        return key if key < due else due

    def prefill_order(self, partial: list[Request], now: float
                      ) -> tuple[list[tuple[float, int, str]], Callable[[Request], float]]:
        """The waiting index and the key of running prompts (``partial``) for this step:
        FCFS while the queue's prefill time (``prefill_time`` of what each prompt has
        left) fits ``fcfs_headroom`` times in the time to the earliest prefill deadline,
        EDF otherwise."""
        headroom = self.config.fcfs_headroom
        due = self.due
        if headroom is None or not (partial or self._waiting_by_due):
            return self._waiting_by_due, due
        earliest = self._waiting_by_due[0][0] if self._waiting_by_due else math.inf
        queued = self._waiting_work
        prefill_time = self.prefill_time
        for r in partial:
            d = due(r)
            if d < earliest:
                earliest = d
            queued += prefill_time(r.num_tokens) - prefill_time(r.num_computed_tokens)
        if queued * headroom <= earliest - now:
            return self._waiting_by_arrival, self.fcfs_key
        if self.config.second_deadline_when_late:
            self._demote_late(now)
        return self._waiting_by_due, due

    def _demote_late(self, now: float) -> None:
        """Give waiting prompts that would miss their deadline even if prefilled alone
        from now on a second deadline, one TTFT SLO later, so they stop taking the steps
        that prompts still on time need, yet wait a bounded time: they go before every
        prompt due after that (with one TTFT SLO for all: every prompt that arrived
        after their deadline). A late prompt stays late, so this happens once per
        prompt; only the head is checked (the others come to it in turn)."""
        by_due, keys, late_ids = self._waiting_by_due, self._waiting_keys, self._late_ids
        while by_due and by_due[0][2] not in late_ids:
            deadline, number, rid = by_due[0]
            by_arrival, work = keys[rid][1:]
            if deadline - now >= work:
                return
            del by_due[0]
            late = (deadline + self.ttft_slo(self.requests[rid]), number, rid)
            bisect.insort(by_due, late)
            keys[rid] = (late, by_arrival, work)
            late_ids.add(rid)
            self.num_late_prompts += 1

    @property
    def step_overhead_s(self) -> float:
        """Host work per step that the latency model does not time (an engine
        calibration records it in the model's metadata; 0 where not measured). A step
        takes its predicted time plus this, so it comes off the time budget."""
        return float(self.latency.metadata.get("host_overhead_s", 0.0))

    def time_budget(self, decodes: list[Request], now: float) -> float:
        """The step's time budget from the running decodes (unbounded without any), wall
        time: the predicted step must fit in it less ``step_overhead_s``. Urgency is
        judged against it even when ``adaptive_capacity`` is off; then it just does not
        bound the step's size (the token budget does)."""
        if not decodes:
            return math.inf
        return self._budget(min(self.due(r) for r in decodes), decodes, now)

    def _budget(self, earliest_due: float, decodes: list[Request], now: float) -> float:
        return max(earliest_due - now, min(self.tpot_slo(r) for r in decodes))

    # ----- the step -------------------------------------------------------------------
    # schedule() runs every step over every running request and weighs each candidate
    # against the latency model, so its hot loops inline what the helpers above compute
    # (Request.num_remaining, due(), StepFeatures.add/with_chunk, BucketConfig.pick,
    # ScheduledChunk for a decode) with the very same expressions: the decisions are those
    # of the plain formulation in the docstrings, only cheaper (tests/sched pins them on
    # hand-built states).
    def schedule(self, now: float) -> StepPlan:
        config = self.config
        decodes, partial = self._running_by_kind()
        dues = decodes.dues
        if dues:
            # Decodes by deadline, as indices into ``decodes``; a stable sort on the
            # deadline alone, so ties keep queue order.
            order = (range(len(dues)) if decodes.in_order
                     else sorted(range(len(dues)), key=dues.__getitem__))
            tpot = decodes.tpot
            tpots = None if tpot is not None else self._tpots(decodes)
            min_tpot = tpot if tpots is None else min(tpots)
            budget = max(dues[order[0]] - now, min_tpot)
            if not config.fair_formation:
                urgent, relaxed = order, []
            elif tpots is None:
                # One TPOT SLO for all: urgency is ``due - now < threshold``, true on a
                # prefix of the deadline order, so a binary search finds where it ends.
                threshold = budget + config.urgency_margin * tpot
                cut, hi = 0, len(order)
                while cut < hi:
                    mid = (cut + hi) // 2
                    if dues[order[mid]] - now < threshold:
                        cut = mid + 1
                    else:
                        hi = mid
                urgent, relaxed = (order, []) if cut == len(order) else (
                    order[:cut], order[cut:])
            else:
                margin = config.urgency_margin
                urgent = [k for k in order if dues[k] - now < budget + margin * tpots[k]]
                relaxed = [k for k in order if not dues[k] - now < budget + margin * tpots[k]]
        else:
            budget, urgent, relaxed = math.inf, [], []
        waiting_index, key = self.prefill_order(partial, now)
        # (key, index, request): the index breaks ties in queue order.
        partial_in_order = sorted([(key(r), i, r) for i, r in enumerate(partial)])
        return self._form(decodes, urgent, partial_in_order, waiting_index, relaxed,
                          budget - self.step_overhead_s if config.adaptive_capacity
                          else math.inf, now)

    def _tpots(self, decodes: _Decodes) -> list[float]:
        """Each decode's TPOT SLO (``tpot_slo()``)."""
        default = self.config.tpot_slo_s
        return [default if c.request.tpot_slo is None else c.request.tpot_slo
                for c in decodes.chunks]

    def _split_running(self) -> tuple[list[Request], list[float], list[float], list[Request]]:
        """The running list split into decodes (with each one's ``due()`` and TPOT SLO)
        and partly prefilled prompts, both in queue order."""
        decodes, partial = self._running_by_kind()
        return ([c.request for c in decodes.chunks], decodes.dues, self._tpots(decodes),
                partial)

    def _running_by_kind(self) -> tuple[_Decodes, list[Request]]:
        """One pass over the running list: its decodes (with their deadlines computed
        inline) and its partly prefilled prompts, both in queue order.

        Each decode's chunk is made here, while its request is at hand, whether or not
        the step takes it: most steps take most decodes, and a second pass over their
        requests would cost more than the chunks left unused. With a running list that
        is cold in the CPU caches, each object made and each request field read is a
        cache miss, so this pass makes one float and one chunk per decode, nothing else.
        """
        config = self.config
        default_ttft, default_tpot = config.ttft_slo_s, config.tpot_slo_s
        arrival_anchor = config.anchor == "arrival"
        stall = config.max_decode_stall_s
        stall_tpots = config.max_decode_stall_tpots
        page_size = self.kv.page_size
        block_table = self.kv.block_table
        new_chunk = object.__new__
        dues: list[float] = []
        chunks: list[ScheduledChunk] = []
        needs_page: list[int] = []
        partial: list[Request] = []
        add_due, add_chunk = dues.append, chunks.append
        last = -math.inf
        in_order = True
        shared = None  # the TPOT SLO of every decode so far
        mixed = False
        for r in self.running:
            outputs = len(r.output_token_ids)
            start = r.num_computed_tokens
            if not outputs or r.prompt_len + outputs - start != 1:
                partial.append(r)
                continue
            tpot = r.tpot_slo
            if tpot is None:
                tpot = default_tpot
            if tpot != shared:
                if shared is None:
                    shared = tpot
                else:
                    mixed = True
            times = r.token_times
            if arrival_anchor:
                ttft = r.ttft_slo
                d = r.arrival_time + (default_ttft if ttft is None else ttft) + outputs * tpot
            else:
                d = times[0] + outputs * tpot
            if stall is not None:
                cap = times[-1] + stall
                if cap < d:
                    d = cap
            if stall_tpots is not None:
                cap = times[-1] + stall_tpots * tpot
                if cap < d:
                    d = cap
            if d < last:
                in_order = False
            last = d
            # Computed tokens always have their pages, so only a decode whose computed
            # tokens fill its last page exactly can need another.
            if not start % page_size and len(block_table(r.request_id)) * page_size <= start:
                needs_page.append(len(dues))
            add_due(d)
            # ScheduledChunk(r, 1, start), field by field: a decode's chunk completes
            # its request's tokens (tests/sched checks that both make equal chunks).
            chunk = new_chunk(ScheduledChunk)
            chunk.request = r
            chunk.num_tokens = 1
            chunk.start = start
            chunk.completes = chunk.is_decode = True
            add_chunk(chunk)
        return _Decodes(dues, chunks, needs_page, in_order, None if mixed else shared), partial

    def _form(self, all_decodes: _Decodes, urgent: list[int], partial: list,
              waiting_index: list[tuple[float, int, str]], relaxed: list[int], budget: float,
              now: float) -> StepPlan:
        """Add urgent decodes (always), then prefills (running and waiting, merged in
        ``prefill_order``; each takes its largest chunk within budget, until one does
        not fit), then relaxed decodes that fit. ``urgent`` and ``relaxed`` index
        ``all_decodes`` (lists or ranges), in deadline order; ``partial`` holds (key, i,
        request) of running prompts; waiting ones come from ``waiting_index``, (key,
        arrival #, id), with keys of the same order.

        In order: once a prefill does not fit, later ones wait; once the pool cannot hold a
        waiting prompt, or the step preempted, no later one is admitted either (the
        victim, now first in line, must not be displaced by a newcomer). A request
        preempted in this step does not come back in it."""
        limits = self.limits
        token_budget = limits.max_num_batched_tokens
        optional_tokens = self.step_tokens  # cap for prefills and relaxed decodes
        max_seqs = limits.max_num_seqs
        kv = self.kv
        page_size = kv.page_size
        block_table = kv.block_table
        allocate = self._allocate_or_preempt
        running = RequestStatus.RUNNING
        decode_chunks = all_decodes.chunks
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        # The step's StepFeatures so far, as locals (StepFeatures.add inlined).
        prefill = decodes = tokens = seqs = kv_read = max_kv = 0
        attn_qk = 0.0
        full = False  # the step holds max_num_seqs sequences: nothing else is weighed

        # 1. Urgent decodes, whatever the time budget. Usually the step holds them all
        # and few need a page: the others join in runs, those few one by one, until one
        # preempts (a victim may be among the later ones: the general loop goes on).
        slow = 0  # urgent[slow:] are weighed one by one
        joined = 0  # chunks[:joined] joined in runs: their features are added below
        if len(urgent) <= max_seqs and len(urgent) <= token_budget:
            slow = len(urgent)
            paged = []  # where in ``urgent`` those needing a page are
            for k in all_decodes.needs_page:
                try:
                    paged.append(urgent.index(k))
                except ValueError:  # a relaxed decode
                    pass
            # In queue order (a range from 0), ``urgent`` holds positions: runs are slices.
            in_place = isinstance(urgent, range)
            done = 0
            for i in sorted(paged):
                chunks += (decode_chunks[done:i] if in_place
                           else [decode_chunks[k] for k in urgent[done:i]])
                done = i + 1
                chunk = decode_chunks[urgent[i]]
                if allocate(chunk.request, 1, preempted):
                    chunks.append(chunk)
                if preempted:
                    slow = done
                    break
            else:
                chunks += (decode_chunks[done:slow] if in_place
                           else [decode_chunks[k] for k in urgent[done:]])
            joined = decodes = tokens = seqs = len(chunks)
        for k in urgent[slow:] if slow else urgent:
            if len(chunks) >= max_seqs:
                full = True
                break
            chunk = decode_chunks[k]
            r = chunk.request
            if r.status is not running:  # preempted earlier in this step
                continue
            if tokens + 1 > token_budget:
                continue
            start = chunk.start
            if (not start % page_size and len(block_table(r.request_id)) * page_size <= start
                    and not allocate(r, 1, preempted)):
                continue
            chunks.append(chunk)
            decodes += 1
            tokens += 1
            seqs += 1
            attn_qk += start + 1
            kv_read += start + 1
            if start + 1 > max_kv:
                max_kv = start + 1
        full = full or len(chunks) >= max_seqs  # then nothing else is weighed
        if joined and not full:  # the step's features matter only if more may join
            starts = [c.start for c in chunks[:joined]]
            context = sum(starts) + joined  # their kv_len (exact in a float: all ints)
            attn_qk += context
            kv_read += context
            if max(starts) + 1 > max_kv:
                max_kv = max(starts) + 1

        # 2. Prefills, running and waiting merged by (key, index); on a tie the running
        # prompt goes first.
        if not full:
            waiting_keys = waiting_index
            requests = self.requests
            admitting = True
            room_cap = min(optional_tokens, token_budget)
            next_partial, num_partial = 0, len(partial)
            while True:
                # While it admits, every waiting prompt taken so far left the queue and
                # none joined it (only a preemption requeues, and that ends admission),
                # so the head of the index is the next one in deadline order.
                head = waiting_keys[0] if admitting and not preempted and waiting_keys else None
                if next_partial < num_partial:
                    item = partial[next_partial]
                    if head is not None and (head[0] < item[0]
                                             or (head[0] == item[0] and head[1] < item[1])):
                        item = None
                    else:
                        next_partial += 1
                elif head is None:
                    break
                else:
                    item = None
                if len(chunks) >= max_seqs:
                    full = True
                    break
                if item is None:
                    r = requests[head[2]]
                    self.take_cached_prefix(r)  # weigh only the prefill really left
                else:
                    r = item[2]
                    if r.status is not running:  # preempted earlier in this step
                        continue
                num = self._largest_chunk(r, budget, room_cap - tokens,
                                          (prefill, decodes, tokens, seqs, attn_qk, kv_read,
                                           max_kv))
                if num == 0:
                    self.return_cached_prefix(r)
                    break  # the earliest prefill left does not fit: later ones wait
                start = r.num_computed_tokens
                if item is None:
                    if not kv.ensure(r.request_id, start + num):
                        self.return_cached_prefix(r)
                        admitting = False
                        continue
                    self.admit(r, now)
                elif not allocate(r, num, preempted):
                    continue
                chunks.append(ScheduledChunk(r, num, start))
                prefill += num
                tokens += num
                seqs += 1
                attn_qk += num * (start + num)
                kv_read += start + num
                if start + num > max_kv:
                    max_kv = start + num

        # 3. Decodes with slack to spare, while the step stays within budget. Each is
        # weighed alone, but with a monotone latency model one prediction can clear a
        # run of them at once: as long as the step stays on one bucket, a step holding
        # any subset of the next m decodes costs no more than one holding all m, so if
        # that fits, each of them passes its own test (and only the other checks run).
        if not full and relaxed:
            unbounded = math.isinf(budget)
            pick = self.pick_bucket
            predict = self.latency.predict
            probe = StepFeatures()
            # Decodes relaxed[:cleared] passed as a run; relaxed[:tried] were in a run
            # that did not (those are weighed one by one).
            cleared = 0
            tried = 0 if self._monotone_latency else len(relaxed)
            index = 0
            for k in relaxed:
                index += 1
                if len(chunks) >= max_seqs:
                    break
                chunk = decode_chunks[k]
                r = chunk.request
                if r.status is not running:  # preempted earlier in this step
                    continue
                if tokens + 1 > optional_tokens:
                    continue
                start = chunk.start
                if tokens + 1 > token_budget or seqs + 1 > max_seqs:
                    continue
                if not unbounded and index > cleared and index > tried:
                    bucket_tokens, bucket_seqs = bucket = pick(tokens + 1, seqs + 1)
                    # The next m decodes (this one first) keep the step on this bucket
                    # however many of them join: seqs + m <= its seqs, tokens + m <= its
                    # tokens.
                    m = min(bucket_seqs - seqs, bucket_tokens - tokens,
                            len(relaxed) - index + 1)
                    if m > 1:
                        context = 0
                        longest = max_kv
                        for j in relaxed[index - 1:index - 1 + m]:
                            kv_len = decode_chunks[j].start + 1
                            context += kv_len
                            if kv_len > longest:
                                longest = kv_len
                        probe.prefill_tokens = prefill
                        probe.num_decodes = decodes + m
                        probe.num_tokens = tokens + m
                        probe.num_seqs = seqs + m
                        probe.attn_qk = attn_qk + context
                        probe.kv_read = kv_read + context
                        probe.max_kv = longest
                        if predict(bucket, probe) <= budget:
                            cleared = index - 1 + m
                        else:
                            tried = index - 1 + m
                if not unbounded and index > cleared:  # predict(with this decode) <= budget
                    probe.prefill_tokens = prefill
                    probe.num_decodes = decodes + 1
                    probe.num_tokens = tokens + 1
                    probe.num_seqs = seqs + 1
                    probe.attn_qk = attn_qk + 1 * (start + 1)
                    probe.kv_read = kv_read + (start + 1)
                    probe.max_kv = max_kv if max_kv >= start + 1 else start + 1
                    if not predict(pick(tokens + 1, seqs + 1), probe) <= budget:
                        continue
                if (not start % page_size and len(block_table(r.request_id)) * page_size <= start
                        and not allocate(r, 1, preempted)):
                    continue
                chunks.append(chunk)
                decodes += 1
                tokens += 1
                seqs += 1
                attn_qk += start + 1
                kv_read += start + 1
                if start + 1 > max_kv:
                    max_kv = start + 1

        if preempted:  # a victim may have been scheduled before it was preempted
            chunks = [c for c in chunks if c.request.status is running]
        if not chunks and self.has_unfinished():
            return self.make_plan(self._force_progress(now, preempted), preempted)
        return self.make_plan(chunks, preempted, tokens)

    def _largest_chunk(self, request: Request, budget: float, room: int,
                       feats: tuple[int, int, int, int, float, int, int]) -> int:
        """Largest chunk of ``request``'s prompt that keeps the step (``feats``: its
        StepFeatures fields so far, in order) within the token, sequence and time
        budgets, rounded down to ``chunk_align`` when partial."""
        prefill, decodes, tokens, seqs, attn_qk, kv_read, max_kv = feats
        most = min(request.num_remaining, room)
        limits = self.limits
        if most <= 0 or seqs >= limits.max_num_seqs:
            return 0
        start = request.num_computed_tokens
        max_tokens, max_seqs = limits.max_num_batched_tokens, limits.max_num_seqs
        unbounded = math.isinf(budget)
        pick, predict = self.pick_bucket, self.latency.predict
        probe = StepFeatures(num_decodes=decodes, num_seqs=seqs + 1)

        def fits(n: int) -> bool:  # the step with this chunk added, as StepFeatures.add
            if tokens + n > max_tokens or seqs + 1 > max_seqs:
                return False
            if unbounded:
                return True
            probe.prefill_tokens = prefill + n
            probe.num_tokens = tokens + n
            probe.attn_qk = attn_qk + n * (start + n)
            probe.kv_read = kv_read + (start + n)
            probe.max_kv = max_kv if max_kv >= start + n else start + n
            return predict(pick(tokens + n, seqs + 1), probe) <= budget

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

    def _force_progress(self, now: float, preempted: list[Request]) -> list[ScheduledChunk]:
        """Nothing fit the budget: run the most urgent request alone, minimally. A running
        one may preempt from the tail like any other (the head of the running list always
        fits alone, so this never comes back empty while work exists); nobody is admitted
        in a step that preempted."""
        candidates = sorted(self.running + list(self.waiting), key=self.due)
        for request in candidates:
            waiting = request.status is RequestStatus.WAITING
            if waiting:
                if preempted:
                    continue
                self.take_cached_prefix(request)
            num = 1 if request.num_remaining == 1 else min(
                request.num_remaining, self.config.chunk_align, self.limits.max_num_batched_tokens)
            start = request.num_computed_tokens
            if waiting:
                if not self.kv.ensure(request.request_id, start + num):
                    self.return_cached_prefix(request)
                    continue
                self.admit(request, now)
            elif not self._allocate_or_preempt(request, num, preempted):
                continue
            return [ScheduledChunk(request, num, start)]
        return []

    # ----- load estimate --------------------------------------------------------------
    def load_estimate(self, now: float) -> dict[str, float]:
        """Prefill Admission Budget (PAB): prompt tokens this instance can still start
        within the TTFT SLO over the next ``load_horizon_s``.

        Over the horizon H, the running decodes must keep pace with their envelopes:
        at least one decode step per ``min tpot`` (cost from the latency model). The
        time left goes to prefill at the largest bucket's throughput; queued prompt
        tokens (waiting and partially prefilled) are served first; what remains is the
        budget a router may fill. Negative means overloaded by that many tokens.
        """
        horizon = self.config.load_horizon_s or self.config.ttft_slo_s
        overhead = self.step_overhead_s
        decodes = [r for r in self.running if r.num_remaining == 1 and r.num_output_tokens]
        decode_time = 0.0
        if decodes:
            feats = StepFeatures.of_chunks((1, r.num_tokens, True) for r in decodes)
            bucket = self.limits.buckets.pick(min(feats.num_tokens,
                                                  self.limits.max_num_batched_tokens),
                                              min(feats.num_seqs, self.limits.max_num_seqs))
            steps = horizon / min(self.tpot_slo(r) for r in decodes)
            decode_time = min(horizon, steps * (self.latency.predict(bucket, feats) + overhead))
        full_tokens = self.limits.max_num_batched_tokens
        full = StepFeatures.of_chunks([(full_tokens, full_tokens, False)])
        full_bucket = self.limits.buckets.pick(full_tokens, 1)
        prefill_rate = full_tokens / (self.latency.predict(full_bucket, full) + overhead)
        queued = sum(r.num_remaining for r in self.running if r.num_remaining > 1)
        queued += sum(self.remaining_after_cache(r) for r in self.waiting)
        capacity = (horizon - decode_time) * prefill_rate
        return {"prefill_admission_budget": capacity - queued, "horizon_s": horizon,
                "decode_time_s": decode_time, "queued_prefill_tokens": float(queued),
                "prefill_tokens_per_s": prefill_rate, "num_running": float(len(self.running)),
                "num_waiting": float(len(self.waiting))}
