"""What every handler shares: the server's settings, its engine thread, metrics and
drain flag, and how a handler gets hold of them.

The state hangs on the app (``app.state.fbjax``) rather than in a module global, so
each app owns its own (tests build several in one process, and a Ray Serve replica
builds its own). Handlers receive it as a FastAPI dependency (:data:`StateDep`): typed
in the signature, and replaceable through ``app.dependency_overrides``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from fbjax.engine.engine import LLMEngine
from fbjax.model.chat_template import ChatTemplate
from fbjax.serve.engine_loop import EngineLoop
from fbjax.serve.metrics import ServerMetrics
from fbjax.web.limits import HttpLimits

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 256  # requests accepted but without a first token; more get 429
    slo_ttft_ms: float | None = None  # default per-request SLOs (None: the scheduler's)
    slo_tpot_ms: float | None = None
    shutdown_grace_s: float = 10.0  # on SIGTERM, in-flight requests get this long
    retry_after_s: int = 1
    limits: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    engine_stall_timeout_s: float = 120.0  # no engine step this long with work: failed


class ServerState:
    """Everything the handlers share: the engine thread, settings, metrics."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings,
                 chat_template: ChatTemplate | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.chat_template = chat_template or ChatTemplate.for_model(engine.config.model)
        self.metrics = ServerMetrics(engine.scheduler.name, settings.model_name,
                                     engine.kv.num_pages)
        self.loop = EngineLoop(engine, self.metrics,
                               stall_timeout_s=settings.engine_stall_timeout_s)
        self.draining = False
        self.address: str | None = None  # where the server listens, for the start-up log

    def begin_drain(self) -> None:
        """Stop taking requests; abort what is still running after the grace period.
        Called on the event loop (from the SIGTERM handler)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d request(s) in flight get %.1f s to finish",
                 self.loop.num_in_flight, self.settings.shutdown_grace_s)
        asyncio.get_running_loop().create_task(self._abort_after_grace())

    async def _abort_after_grace(self) -> None:
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.loop.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in self.loop.in_flight():
            self.loop.abort(rid, notify=True)


def attach(app: FastAPI, state: ServerState) -> None:
    """Make ``state`` the one :func:`app_state` and :func:`state_of` find for ``app``."""
    app.state.fbjax = state


def app_state(app: FastAPI) -> ServerState:
    return app.state.fbjax


def state_of(request: Request) -> ServerState:
    """The state of the app that received ``request`` (for exception handlers, which
    get no dependencies)."""
    return app_state(request.app)


async def server_state(request: Request) -> ServerState:
    """The dependency behind :data:`StateDep`; async, so FastAPI does not hand it to
    its thread pool."""
    return state_of(request)


StateDep = Annotated[ServerState, Depends(server_state)]


def load_snapshot(engine: LLMEngine) -> dict[str, Any]:
    """The engine's load as ``GET /load`` and the Ray Serve routing stats report it: queue
    and KV counts, and the scheduler's load estimate where it has one (FairBatching).
    Run it on the engine thread (``EngineLoop.call``). It never raises on engine state:
    an estimate that cannot be computed is reported as null with the reason, so a router
    falls back to the counts instead of taking the replica out."""
    sched = engine.scheduler
    estimate = getattr(sched, "load_estimate", None)
    out: dict[str, Any] = {
        "scheduler": sched.name,
        "num_running": sched.num_running, "num_waiting": sched.num_waiting,
        "kv_free_pages": engine.kv.num_free_pages, "kv_total_pages": engine.kv.num_pages,
        "kv_usage": engine.kv.usage(), "prefix_cache_hit_rate": sched.prefix_cache_hit_rate(),
        "load_estimate": None}
    if callable(estimate):
        try:
            out["load_estimate"] = estimate(time.monotonic())
        except Exception as e:  # noqa: BLE001 -- report it, do not fail the probe
            log.exception("load estimate failed")
            out["load_estimate_error"] = repr(e)
    return out
