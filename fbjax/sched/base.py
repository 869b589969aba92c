"""The Scheduler protocol shared by every policy, the engine and the simulator.

A scheduler owns the running and waiting queues and the KV page tables. Each step the
executor calls ``schedule(now)`` and gets a ``StepPlan``: the bucket to run and the
(request, tokens) chunks to compute. After running it, the executor reports the
sampled tokens with ``on_step_done``. The scheduler never touches arrays or devices.

Admission and preemption live here so every policy handles a full KV pool the same
way: a chunk is scheduled only once its pages are allocated; when they cannot be,
the policy preempts (frees the victim's pages and requeues it at the front of the
waiting queue for recompute). Preemption always makes room or removes the requester
itself, so a full pool never stalls the engine.

Prefix caching (when the KV manager has it on) lives here too: a waiting request about
to be weighed for admission first takes the cached pages of its longest known prefix
(``take_cached_prefix``), which advances its ``num_computed_tokens``, so every policy's
chunk sizes, time budgets and KV checks see only the prefill that is really left; if it
is not admitted after all it gives them back (``return_cached_prefix``). Pages are
published as soon as a step has filled them (``on_step_done``).
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
from collections import deque
from collections.abc import Callable

from fbjax.config import BucketConfig
from fbjax.sched.kv_cache import KVCacheManager, token_page_keys
from fbjax.sched.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING
_WAITING = RequestStatus.WAITING


@dataclasses.dataclass(slots=True, init=False)
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at ``start`` (its computed count).

    ``completes`` (the chunk reaches the end of the request's known tokens, so the step
    samples its next token) and ``is_decode`` (one new token of a request that is
    already generating) are fixed when the chunk is planned.
    """

    request: Request
    num_tokens: int
    start: int
    completes: bool = dataclasses.field(init=False)
    is_decode: bool = dataclasses.field(init=False)

    def __init__(self, request: Request, num_tokens: int, start: int) -> None:
        # Request.num_tokens / num_output_tokens inlined: one chunk per request per step.
        self.request = request
        self.num_tokens = num_tokens
        self.start = start
        outputs = len(request.output_token_ids)
        self.completes = completes = start + num_tokens == request.prompt_len + outputs
        self.is_decode = num_tokens == 1 and completes and outputs > 0

    @property
    def kv_len(self) -> int:
        """Context the chunk attends over, its own tokens included."""
        return self.start + self.num_tokens


@dataclasses.dataclass
class StepPlan:
    bucket: tuple[int, int]  # (tokens, seqs) of the compiled executable to run
    chunks: list[ScheduledChunk]
    preempted: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


def bucket_picker(buckets: BucketConfig) -> Callable[[int, int], tuple[int, int]]:
    """``buckets.pick`` as two table look-ups (the same answers, errors included): a
    policy may ask it for every candidate chunk it weighs."""
    max_tokens, max_seqs = buckets.max_tokens, buckets.max_seqs
    seq_ladder, token_ladder = buckets.seq_buckets, buckets.token_buckets
    seq_of = [seq_ladder[bisect.bisect_left(seq_ladder, max(n, 1))] for n in range(max_seqs + 1)]
    token_of = [token_ladder[bisect.bisect_left(token_ladder, n)] for n in range(max_tokens + 1)]

    def pick(num_tokens: int, num_seqs: int) -> tuple[int, int]:
        if not (0 <= num_tokens <= max_tokens and 0 <= num_seqs <= max_seqs):
            return buckets.pick(num_tokens, num_seqs)
        seqs = seq_of[num_seqs]
        return token_of[num_tokens if num_tokens > seqs else seqs], seqs

    return pick


@dataclasses.dataclass(frozen=True)
class StepLimits:
    """What one step may hold: the bucket ladders and the policy's own caps."""

    buckets: BucketConfig
    max_num_batched_tokens: int
    max_num_seqs: int

    @classmethod
    def from_buckets(cls, buckets: BucketConfig, max_tokens: int | None = None,
                     max_seqs: int | None = None) -> StepLimits:
        tokens = min(max_tokens or buckets.max_tokens, buckets.max_tokens)
        seqs = min(max_seqs or buckets.max_seqs, buckets.max_seqs)
        return cls(buckets, tokens, seqs)


class Scheduler(abc.ABC):
    """Queues, KV admission and step bookkeeping; subclasses choose each step's chunks."""

    name = "base"

    def __init__(self, limits: StepLimits, kv: KVCacheManager) -> None:
        self.limits = limits
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.pick_bucket = bucket_picker(limits.buckets)
        # Prefix cache: tokens to compute at admissions, and of those found cached.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ----- queue management -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if self.kv.pages_for(request.prompt_len + request.sampling.max_tokens) > self.kv.num_pages:
            raise ValueError(
                f"request {request.request_id!r} needs up to "
                f"{request.prompt_len + request.sampling.max_tokens} tokens of KV cache but the "
                f"pool holds {self.kv.capacity_tokens}")
        # A request that wants its prompt's log-probabilities computes every prompt token
        # (a cached prefix would skip them), as in vLLM.
        if (self.kv.enable_prefix_caching and request.page_keys is None and request.token_ids
                and request.sampling.prompt_logprobs is None):
            request.page_keys = token_page_keys(request.token_ids, self.kv.page_size)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._waiting_added(request)

    def abort_request(self, request_id: str, now: float | None = None) -> Request | None:
        """Cancel a request wherever it is; its pages return to the pool at once."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED, now)
        return request

    def finish_request(self, request: Request, status: RequestStatus,
                       now: float | None = None) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
            self._waiting_removed(request)
        request.status = status
        request.finish_time = now
        self.kv.free(request.request_id)
        self.requests.pop(request.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _waiting_added(self, request: Request) -> None:  # noqa: B027 (optional hook)
        """Hook: ``request`` joined the waiting queue (policies that index it override)."""

    def _waiting_removed(self, request: Request) -> None:  # noqa: B027 (optional hook)
        """Hook: ``request`` left the waiting queue (admitted, aborted)."""

    # ----- the step ---------------------------------------------------------------
    @abc.abstractmethod
    def schedule(self, now: float) -> StepPlan:
        """Choose this step's chunks; allocate their pages; preempt if needed."""

    def on_step_done(self, plan: StepPlan, sampled: dict[str, int], now: float) -> list[Request]:
        """Record the step: advance computed counts, append sampled tokens, finish
        requests on EOS / stop ids / max_tokens. Returns the requests that finished."""
        finished = []
        caching = self.kv.enable_prefix_caching
        page_size = self.kv.page_size
        for chunk in plan.chunks:
            request = chunk.request
            status = request.status
            if status is not _RUNNING and status.finished:  # aborted while the step ran
                continue
            request.num_computed_tokens = computed = chunk.start + chunk.num_tokens
            if caching and computed // page_size > chunk.start // page_size:
                self._publish_pages(request, computed)
            if not chunk.completes:
                continue
            status = request.add_output(sampled[request.request_id], now)
            if status is not None:
                self.finish_request(request, status, now)
                finished.append(request)
        return finished

    # ----- prefix caching -----------------------------------------------------------
    def take_cached_prefix(self, request: Request) -> int:
        """Give a waiting request that holds no pages the cached pages of its longest
        published prefix (never its last token: that one's logits are needed) and count
        them as computed; returns the tokens covered."""
        if (request.num_computed_tokens or request.page_keys is None
                or not self.kv.enable_prefix_caching):
            return 0
        hit = self.kv.acquire_prefix(request.request_id, request.page_keys,
                                     request.num_tokens - 1)
        request.num_computed_tokens = hit
        return hit

    def return_cached_prefix(self, request: Request) -> None:
        """Undo ``take_cached_prefix`` for a request that stays waiting: holding pages
        while queued would pin them (the cache may also hold more by its turn)."""
        if request.status is _WAITING and request.num_computed_tokens:
            self.kv.free(request.request_id)
            request.num_computed_tokens = 0

    def remaining_after_cache(self, request: Request) -> int:
        """Tokens ``request`` still has to compute, less what the cache would supply
        now if it were admitted (a look only: a load estimate's view of the queue)."""
        remaining = request.num_remaining
        if request.num_computed_tokens or request.page_keys is None:
            return remaining
        return remaining - self.kv.cached_prefix_tokens(request.page_keys,
                                                        request.num_tokens - 1)

    def prefix_cache_hit_rate(self) -> float:
        """Share of the tokens admitted requests had to compute that the cache supplied."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens \
            else 0.0

    def _publish_pages(self, request: Request, computed: int) -> None:
        """Publish ``request``'s pages that ``computed`` tokens fill; in the engine, the
        keys grow over generated tokens too (a follow-up turn reuses the answer)."""
        keys = request.page_keys
        if keys is None:
            return
        page_size = self.kv.page_size
        full = computed // page_size
        if len(keys) < full and len(request.token_ids) >= full * page_size \
                and isinstance(keys, list):
            keys.extend(token_page_keys(request.token_ids[:full * page_size], page_size,
                                        start_page=len(keys),
                                        previous=keys[-1] if keys else None))
        self.kv.register_pages(request.request_id, keys, computed)

    # ----- helpers for policies ---------------------------------------------------
    def make_plan(self, chunks: list[ScheduledChunk], preempted: list[Request],
                  num_tokens: int | None = None) -> StepPlan:
        """The plan of ``chunks``, less any whose request was preempted after being
        scheduled (a victim is taken from the tail of the running list, which a policy
        that reorders its candidates may already have scheduled). ``num_tokens``: their
        total if the caller kept count (ignored when some were preempted)."""
        if preempted:
            chunks = [c for c in chunks if c.request.status is _RUNNING]
            num_tokens = None
        if num_tokens is None:
            num_tokens = sum([c.num_tokens for c in chunks])
        bucket = self.pick_bucket(num_tokens, len(chunks)) if chunks else (0, 0)
        return StepPlan(bucket, chunks, preempted)

    def admit_waiting_fcfs(self, chunks: list[ScheduledChunk], budget: int,
                           now: float) -> None:
        """Admit waiting requests first-come-first-served (see ``admit_in_order``)."""
        waiting = self.waiting
        self.admit_in_order(chunks, budget, now, lambda: waiting[0] if waiting else None)

    def admit_in_order(self, chunks: list[ScheduledChunk], budget: int, now: float,
                       head: Callable[[], Request | None]) -> None:
        """Admit ``head()`` (the next waiting request in the policy's order, None when
        none is left) into ``chunks``, each chunked to the tokens left; stop at the first
        the step or the KV pool cannot hold (no skipping ahead, so a long prompt is never
        starved by shorter later ones)."""
        max_seqs = self.limits.max_num_seqs
        # Each pass admits the head or stops, so ``head()`` is the next one.
        while budget > 0 and len(chunks) < max_seqs:
            request = head()
            if request is None:
                break
            self.take_cached_prefix(request)
            num = min(request.num_remaining, budget)
            if not self.kv.ensure(request.request_id, request.num_computed_tokens + num):
                self.return_cached_prefix(request)
                break
            self.admit(request, now)
            chunks.append(ScheduledChunk(request, num, request.num_computed_tokens))
            budget -= num

    def admit(self, request: Request, now: float) -> None:
        """Move a waiting request to the running list."""
        waiting = self.waiting
        if waiting and waiting[0] is request:  # the usual case: FCFS admits the head
            waiting.popleft()
        else:
            waiting.remove(request)
        self._waiting_removed(request)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
            request.num_cached_tokens = request.num_computed_tokens
        if self.kv.enable_prefix_caching:  # every admission, recomputes too
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += request.num_computed_tokens

    def _allocate_or_preempt(self, request: Request, num_tokens: int,
                             preempted: list[Request]) -> bool:
        """Allocate pages for ``num_tokens`` more tokens of a running request, preempting
        from the tail of the running list until they fit. False if ``request`` itself
        had to go (it was the lowest priority left)."""
        needed = request.num_computed_tokens + num_tokens
        if len(self.kv.block_table(request.request_id)) * self.kv.page_size >= needed:
            return True  # its pages already hold them (a decode needs a page 1 step in 16)
        while not self.kv.ensure(request.request_id, needed):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def preempt(self, request: Request) -> None:
        """Free ``request``'s pages and requeue it first in line, to be recomputed."""
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._waiting_added(request)
