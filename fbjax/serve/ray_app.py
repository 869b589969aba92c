"""fbjax on Ray Serve: one engine per replica, routed by the Prefill Admission Budget.

``python -m fbjax.serve --ray --replicas N`` (or :func:`deploy` from Python) runs the
same FastAPI app as the standalone server inside each Ray Serve replica (an ASGI
builder, so every replica process builds its own engine). Each replica publishes its
FairBatching load estimate through Ray Serve's ``record_routing_stats`` hook, and
:class:`PABRequestRouter`, a custom ``RequestRouter``, ranks replicas with the very
policy code of the standalone router and the cluster simulator
(``fbjax.routing.policy``). Ray's HTTP proxy does not parse bodies, so this router
ranks by budget alone (prompt length 0): the replica with the most admission budget
first, an idle replica when every budget is spent.

Ray is an optional extra: ``pip install 'fbjax[ray]'``.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from fbjax.config import EngineConfig
from fbjax.routing.policy import PrefillAdmissionBudget, ReplicaState, release_target
from fbjax.serve.app import ServerSettings, ServerState, build_app, load_snapshot

log = logging.getLogger(__name__)

# This replica's server state: one engine per replica process, built by the ASGI builder.
_STATE: ServerState | None = None
REPLICA_HEADER = "x-fbjax-replica"


class PABRequestRouter(FIFOMixin, RequestRouter):
    """Ranks replicas by their published Prefill Admission Budget."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        states = [ReplicaState(str(r.replica_id), True,
                               int((r.routing_stats or {}).get("in_flight", 0)),
                               (r.routing_stats or {}).get("prefill_admission_budget"))
                  for r in candidate_replicas]
        first = PrefillAdmissionBudget().choose(states, 0)
        if first is None:
            first = release_target(states)
        rest = sorted((i for i in range(len(states)) if i != first),
                      key=lambda i: -(states[i].budget if states[i].budget is not None
                                      else float("-inf")))
        return [[candidate_replicas[first]], [candidate_replicas[i] for i in rest]]


class FbjaxReplica:
    """The deployment class: the ASGI app does the serving; this adds the stats hook."""

    async def record_routing_stats(self) -> dict[str, Any]:
        if _STATE is None:
            return {}

        load = await _STATE.loop.call(load_snapshot)
        estimate = load["load_estimate"] or {}
        return {"prefill_admission_budget": estimate.get("prefill_admission_budget"),
                "in_flight": load["num_running"] + load["num_waiting"]}


def _asgi_builder(config: EngineConfig, settings: ServerSettings,
                  chat_template: str | None = None):
    def build():
        # Ray pickles this closure by value, globals included: set the state on the
        # imported module, where FbjaxReplica.record_routing_stats reads it.
        from fbjax.engine.engine import LLMEngine
        from fbjax.model.chat_template import ChatTemplate
        from fbjax.serve import ray_app

        engine = LLMEngine(config)
        state = ServerState(engine, settings,
                            ChatTemplate.for_model(config.model, chat_template))
        ray_app._STATE = state
        app = build_app(state)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    return build


def fbjax_application(config: EngineConfig, settings: ServerSettings, num_replicas: int,
                      stats_period_s: float = 0.1, cpus_per_replica: float = 1.0,
                      chat_template: str | None = None):
    """The Ray Serve application: ``serve.run(fbjax_application(...))``."""
    deployment = serve.deployment(
        serve.ingress(_asgi_builder(config, settings, chat_template))(FbjaxReplica),
        name="fbjax", num_replicas=num_replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=settings.max_queue,
        request_router_config=RequestRouterConfig(
            request_router_class=PABRequestRouter,
            request_routing_stats_period_s=stats_period_s,
            request_routing_stats_timeout_s=max(1.0, 10 * stats_period_s)))
    return deployment.bind()


def run_forever(config: EngineConfig, settings: ServerSettings, num_replicas: int,
                host: str, port: int, chat_template: str | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, serve on host:port until SIGTERM/SIGINT."""
    import signal
    import threading

    import ray

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(fbjax_application(config, settings, num_replicas, chat_template=chat_template),
              route_prefix="/")
    log.info("listening on http://%s:%d (%d Ray Serve replicas, PAB routing)", host, port,
             num_replicas)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
