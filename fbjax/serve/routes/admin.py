"""The endpoints around generation: ``GET /v1/models`` (and one model), ``/health``,
``/metrics`` (Prometheus) and ``/load`` (the scheduler's load estimate, for a router)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from fbjax.serve.engine_loop import EngineFailedError
from fbjax.serve.protocol import model_card
from fbjax.serve.state import StateDep, load_snapshot
from fbjax.serve.validation import check_draining, check_engine, check_model, engine_failed

router = APIRouter()


@router.get("/v1/models", response_model=None)
async def models(state: StateDep) -> dict[str, Any]:
    return {"object": "list",
            "data": [model_card(state.settings.model_name, state.max_model_len)]}


@router.get("/v1/models/{model:path}", response_model=None)
async def model(model: str, state: StateDep) -> dict[str, Any]:
    return model_card(check_model(state, model), state.max_model_len)


@router.get("/health", response_model=None)
async def health(state: StateDep) -> dict[str, str]:
    check_draining(state)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/load", response_model=None)
async def load(state: StateDep) -> dict[str, Any]:
    """The engine's load (read on its thread) with the server's queue and drain state;
    503 once the engine has failed (a router then takes the replica out)."""
    check_engine(state)
    try:
        out = await state.loop.call(load_snapshot)
    except EngineFailedError as e:
        raise engine_failed(e) from None
    out.update(num_queued=state.loop.num_queued, max_queue=state.settings.max_queue,
               draining=state.draining)
    return out
