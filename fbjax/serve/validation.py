"""The checks a generation request passes before it reaches the engine, each raising the
OpenAI-shaped error a client expects (400 bad value, 404 unknown model, 413 prompt too
long, 429 queue full, 503 draining), so that no bad request costs engine time."""

from __future__ import annotations

from fbjax.sched.request import InvalidRequestError, check_slo
from fbjax.serve.protocol import MAX_N, MAX_STOP, ChatCompletionRequest, CompletionRequest
from fbjax.serve.state import ServerState
from fbjax.web.errors import OpenAIError

GenerateRequest = CompletionRequest | ChatCompletionRequest


def check_model(state: ServerState, model: str | None) -> str:
    """The name to answer with: the served name for it, its engine's model path, or none."""
    name = state.settings.model_name
    if model is None or model in (name, state.engine.config.model):
        return name
    raise OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                      f"{name!r}", "model", "model_not_found")


def check_sampling(body: GenerateRequest) -> None:
    if body.temperature < 0:
        raise OpenAIError(400, f"temperature must be >= 0, got {body.temperature}",
                          "temperature")
    if not 0.0 < body.top_p <= 1.0:
        raise OpenAIError(400, f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    if body.top_k < -1:
        raise OpenAIError(400, f"top_k must be >= -1 (0 or -1 disables it), got {body.top_k}",
                          "top_k")
    if not 1 <= body.n <= MAX_N:
        raise OpenAIError(400, f"n must be between 1 and {MAX_N}, got {body.n}", "n")
    for name in ("slo_ttft_ms", "slo_tpot_ms"):
        try:
            check_slo(name, getattr(body, name), unit_s=1e-3)
        except InvalidRequestError as e:
            raise OpenAIError(400, str(e), name) from None
    for field, why in body.unsupported():
        raise OpenAIError(400, why, field)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise OpenAIError(400, f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise OpenAIError(400, "stop strings must be non-empty", "stop")
    return stops


def fit_max_tokens(requested: int | None, prompt_len: int, context: int, param: str) -> int:
    """The max_tokens to run with: ``requested`` if it fits the context, or what is left
    of the context when the client gave none."""
    if prompt_len >= context:
        raise OpenAIError(413, f"the prompt has {prompt_len} tokens but the model's context "
                          f"is {context} tokens (at least one must be left to generate)",
                          "prompt", "context_length_exceeded")
    left = context - prompt_len
    if requested is None:
        return left
    if requested < 1:
        raise OpenAIError(400, f"{param} must be >= 1, got {requested}", param)
    if requested > left:
        raise OpenAIError(400, f"{param}={requested} is too large: the prompt has "
                          f"{prompt_len} tokens and the context is {context}, so at most "
                          f"{left} can be generated", param, "context_length_exceeded")
    return requested


def engine_failed(reason: object) -> OpenAIError:
    return OpenAIError(503, f"the engine cannot serve: {reason}", None, "engine_failed")


def check_engine(state: ServerState) -> None:
    """503 once the engine thread has failed, died or stalled."""
    reason = state.loop.health()
    if reason is not None:
        raise engine_failed(reason)


def check_draining(state: ServerState) -> None:
    """503 while the server drains for shutdown or its engine has failed."""
    if state.draining:
        raise OpenAIError(503, "the server is shutting down", None, "shutting_down")
    check_engine(state)


def check_fits(state: ServerState, num_choices: int) -> None:
    """A request with more choices (prompts x n) than the queue can ever hold is a 400
    naming the limit: a 429 would have the client retry something that cannot succeed."""
    limit = state.settings.max_queue
    if num_choices > limit:
        raise OpenAIError(400, f"this request asks for {num_choices} completions (prompts "
                          f"x n) but the server queues at most {limit} (--max_queue); send "
                          "fewer prompts or a smaller n", "prompt", "too_many_completions")


def admit(state: ServerState, num_choices: int) -> None:
    """Refuse new work while draining, or when it would overfill the queue of requests
    still waiting for a first token (``--max_queue``; 429, try again later)."""
    check_draining(state)
    queued, limit = state.loop.num_queued, state.settings.max_queue
    if queued + num_choices > limit:
        raise OpenAIError(429, f"the queue is full ({queued} requests waiting, limit "
                          f"{limit}); retry later", None, "queue_full",
                          {"Retry-After": str(state.settings.retry_after_s)})
