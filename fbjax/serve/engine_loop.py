"""The engine thread: owns the LLMEngine and steps it beside the asyncio event loop.

Only this thread touches the engine (and through it the scheduler and the KV pool),
so none of them needs a lock. The event loop talks to it through a thread-safe
command queue (add, abort, call) and gets back, once per step, a batch of
:class:`Event` s (new tokens; the final output of a finished or aborted request)
delivered with ``loop.call_soon_threadsafe``. The thread blocks on the command
queue while the engine is idle and drains it between steps while busy, so an abort
frees its request's KV pages before the next step runs.

**Supervision.** A failed step fails the requests the engine had accepted (each client
gets an error event) and the engine goes on; ``MAX_CONSECUTIVE_STEP_FAILURES`` in a row,
an exception anywhere else in the thread, the thread's death or a stall (no loop
iteration for ``stall_timeout_s`` while requests are in flight) make the engine *failed*:
:attr:`EngineLoop.failure` says why, every waiting client gets an error event and every
pending :meth:`add` / :meth:`call` an :class:`EngineFailedError` at once, new work is
refused (the server answers 503 and ``/health`` turns 503), and shutdown still exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from fbjax.engine.engine import CompletionOutput, LLMEngine
from fbjax.sched.request import SamplingParams, TokenLogprob
from fbjax.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineFailedError(RuntimeError):
    """The engine thread can serve no more; the message says why."""


@dataclasses.dataclass
class Submission:
    """A validated request for the engine (prompt already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    ttft_slo: float | None = None
    tpot_slo: float | None = None


@dataclasses.dataclass
class Event:
    """What one step (or an abort) produced for one request."""

    request_id: str
    new_token_ids: list[int]
    final: CompletionOutput | None = None  # set once, when the request is done
    error: str | None = None  # the engine failed this request
    logprobs: list[TokenLogprob] | None = None  # of new_token_ids, if the request asked


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None, *,
                 stall_timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._watchdog: asyncio.Task | None = None
        # Set once, on the event loop, when the engine can serve no more.
        self.failure: str | None = None
        # Engine thread: when its current busy iteration began (None while it waits
        # idle for commands; read by the watchdog), the requests it accepted and has not
        # answered, failed steps in a row.
        self._busy_since: float | None = None
        self._accepted: set[str] = set()
        self._step_failures = 0
        # Event-loop side: futures of add/call commands the engine has not answered.
        self._pending: set[asyncio.Future] = set()
        # Event-loop side only: where each request's events go, and which requests
        # are accepted but have not produced a token yet (the queue --max_queue caps).
        self._routes: dict[str, Callable[[Event], None]] = {}
        self._unstarted: set[str] = set()

    # ----- event-loop side -----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fbjax-engine", daemon=True)
        self._thread.start()
        self._watchdog = loop.create_task(self._watch())

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._thread is not None:
            # A failed engine's thread may be stuck for good: do not wait on it long (it
            # is a daemon thread, so the process still exits).
            self._thread.join(min(timeout, 1.0) if self.failure else timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s; leaving it", timeout)

    def health(self) -> str | None:
        """Why the engine cannot serve, or None while it can."""
        if self.failure is not None:
            return self.failure
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread is not running"
        busy_since = self._busy_since  # one read: the engine thread writes it
        age = 0.0 if busy_since is None else time.monotonic() - busy_since
        if self._routes and age > self.stall_timeout_s:
            return (f"the engine has not stepped for {age:.0f} s with "
                    f"{len(self._routes)} request(s) in flight")
        return None

    async def _watch(self, period_s: float = 0.5) -> None:
        """Turn a dead or stalled engine thread into a failure that clients see."""
        while self.failure is None:
            await asyncio.sleep(period_s)
            reason = self.health()
            if reason is not None:
                self._fail(reason)

    def _fail(self, reason: str) -> None:
        """The engine can serve no more: answer everyone waiting, refuse what comes."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("engine failed: %s; failing %d request(s) in flight", reason,
                  len(self._routes))
        routes, self._routes = self._routes, {}
        self._unstarted.clear()
        for rid, route in routes.items():
            self._count_failed()
            route(Event(rid, [], None, f"engine failed: {reason}"))
        pending, self._pending = self._pending, set()
        for fut in pending:
            self._resolve(fut, None, EngineFailedError(reason))

    @property
    def num_queued(self) -> int:
        """Accepted requests that have not produced their first token."""
        return len(self._unstarted)

    @property
    def num_in_flight(self) -> int:
        return len(self._routes)

    def in_flight(self) -> list[str]:
        return list(self._routes)

    async def add(self, submission: Submission, on_event: Callable[[Event], None]) -> None:
        """Queue a request; returns once the engine accepted it, or raises its
        InvalidRequestError. ``on_event`` is called on the event loop with each Event."""
        if self.failure is not None:
            raise EngineFailedError(self.failure)
        fut = self._future()
        rid = submission.request_id
        self._routes[rid] = on_event
        self._unstarted.add(rid)
        self._commands.put(("add", submission, fut))
        try:
            await fut
        except BaseException:
            self._routes.pop(rid, None)
            self._unstarted.discard(rid)
            if not fut.done() or fut.cancelled():  # cancelled while queued: undo the add
                self._commands.put(("abort", rid))
            raise

    def abort(self, request_id: str, notify: bool = False) -> None:
        """Abort a request; with ``notify`` its final event (reason "abort") is still
        delivered, otherwise it is forgotten at once (its client is gone)."""
        if not notify:
            self._routes.pop(request_id, None)
            self._unstarted.discard(request_id)
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps; its result."""
        if self.failure is not None:
            raise EngineFailedError(self.failure)
        fut = self._future()
        self._commands.put(("call", fn, fut))
        return await fut

    def _future(self) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if ev.new_token_ids or ev.final is not None or ev.error is not None:
                self._unstarted.discard(ev.request_id)
            done = ev.final is not None or ev.error is not None
            route = self._routes.pop(ev.request_id, None) if done else \
                self._routes.get(ev.request_id)
            if route is not None:
                route(ev)

    def _resolve(self, fut: asyncio.Future, result: Any = None,
                 error: BaseException | None = None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    # ----- engine thread -------------------------------------------------------------
    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- whatever it was, clients must hear
            log.exception("the engine thread died")
            self._post(self._fail, f"the engine thread died: {e!r}")

    def _serve(self) -> None:
        engine = self.engine
        while not self._stopping:
            events: list[Event] = []
            busy = engine.has_unfinished_requests()
            # Waiting idle for a command is not a stall; one iteration that runs too long is.
            self._busy_since = time.monotonic() if busy else None
            try:
                command = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                command = ()
            self._busy_since = time.monotonic()
            while command != ():
                if command is None:
                    return
                try:
                    self._execute(command, events)
                except Exception:  # never let a bad command stop the thread
                    log.exception("engine command %s failed", command[0])
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = ()
            if engine.has_unfinished_requests():
                self._step(events)
            self._observe_state()
            if events:
                self._post(self._dispatch, events)

    def _execute(self, command: tuple, events: list[Event]) -> None:
        kind = command[0]
        if kind == "add":
            _, sub, fut = command
            try:
                self.engine.add_request(sub.prompt_token_ids, sub.sampling, sub.request_id,
                                        sub.arrival_time, sub.ttft_slo, sub.tpot_slo)
            except Exception as e:  # InvalidRequestError, mostly; the caller maps it
                self._post(self._resolve, fut, None, e)
            else:
                self._accepted.add(sub.request_id)
                self._post(self._resolve, fut)
        elif kind == "abort":
            rid = command[1]
            if self.engine.abort_request(rid):
                self._accepted.discard(rid)
                final = self.engine.pop_finished(rid)
                if self.metrics is not None:
                    self.metrics.observe_finished(final)
                events.append(Event(rid, [], final))
        elif kind == "call":
            _, fn, fut = command
            try:
                result = fn(self.engine)
            except Exception as e:
                self._post(self._resolve, fut, None, e)
            else:
                self._post(self._resolve, fut, result)

    def _step(self, events: list[Event]) -> None:
        engine = self.engine
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as e:  # an engine bug: fail what it had accepted, keep serving
            self._step_failed(e, events)
            return
        self._step_failures = 0
        duration = time.perf_counter() - start
        if self.metrics is not None and engine.last_plan is not None:
            self.metrics.observe_step(engine.last_plan, duration,
                                      engine.scheduler.num_preemptions)
        for out in outputs:
            final = engine.pop_finished(out.request_id) if out.finished else None
            if final is not None:
                self._accepted.discard(out.request_id)
                if self.metrics is not None:
                    self.metrics.observe_finished(final)
            events.append(Event(out.request_id, out.new_token_ids, final, None, out.logprobs))

    def _step_failed(self, error: Exception, events: list[Event]) -> None:
        """Fail every request the engine accepted and has not answered: those still
        scheduled are aborted (their pages freed), and those a partial step already
        finished get their error too. Several failures in a row: the engine is broken."""
        self._step_failures += 1
        log.exception("engine step failed (%d in a row); failing %d request(s)",
                      self._step_failures, len(self._accepted))
        for rid in sorted(self._accepted):
            if self.engine.abort_request(rid):
                self.engine.pop_finished(rid)
            self._count_failed()
            events.append(Event(rid, [], None, f"engine step failed: {error}"))
        self._accepted.clear()
        if self._step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineFailedError(f"{self._step_failures} engine steps failed in a row; "
                                    f"the last: {error!r}") from error

    def _count_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels("error").inc()

    def _observe_state(self) -> None:
        if self.metrics is not None:
            sched = self.engine.scheduler
            self.metrics.observe_state(sched.num_running, sched.num_waiting,
                                       self.engine.kv.num_free_pages)
            self.metrics.observe_prefix_cache(sched.prefix_query_tokens,
                                              sched.prefix_hit_tokens)
