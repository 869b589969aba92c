"""The one path both generation endpoints take, from a parsed body to a response.

``/v1/completions`` and ``/v1/chat/completions`` differ only in how the body becomes
prompts (the prompt field vs the chat template over the messages) and in the shape of
their bodies (:mod:`fbjax.serve.responses`). Everything else happens here, once, and in
this order, so both answer a bad request with the same error: the model (404), the
sampling fields (400), the stop strings, the prompts (the endpoint's own checks; 413 for
a prompt that does not fit), ``max_tokens`` and per-choice validation by the engine,
then draining (503) and the queue limit (429), then the ``n`` choices of every prompt go
to the engine and the answer streams or waits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from fbjax.sched.request import InvalidRequestError, SamplingParams
from fbjax.serve.engine_loop import Submission
from fbjax.serve.generation import Generation
from fbjax.serve.protocol import ChatCompletionRequest, CompletionRequest, new_id
from fbjax.serve.responses import ResponseBodies
from fbjax.serve.state import ServerState
from fbjax.serve.streaming import respond
from fbjax.serve.validation import (
    GenerateRequest,
    admit,
    check_fits,
    check_model,
    check_sampling,
    fit_max_tokens,
    stop_strings,
)
from fbjax.web.errors import OpenAIError

R = TypeVar("R", CompletionRequest, ChatCompletionRequest)
# The engine's names for fields the API names otherwise.
_SERVER_PARAMS = {"ttft_slo": "slo_ttft_ms", "tpot_slo": "slo_tpot_ms"}


@dataclasses.dataclass
class Prompts:
    """What an endpoint makes of its body."""

    token_ids: list[list[int]]  # one list per prompt; choice p * n + j is prompt p's j-th
    max_tokens: int | None  # the client's cap on new tokens; None: what the context leaves
    param: str  # the field max_tokens came from, for error messages
    # ``echo``: each prompt's text, put before its choices' text (and its tokens' logprobs)
    echo_texts: list[str] | None = None
    # ``max_tokens: 0`` with ``echo``: run one token (a prefill samples one) and answer
    # with the prompt only, as OpenAI's scoring requests expect
    prompt_only: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.token_ids))


async def generate(request: Request, state: ServerState, body: R,
                   prompts: Callable[[ServerState, R], Prompts],
                   bodies: type[ResponseBodies]) -> Response:
    """Validate ``body``, admit it, run its choices and answer (see the module docstring).
    ``prompts`` and ``bodies`` are what the endpoint adds."""
    arrival = time.monotonic()
    model = check_model(state, body.model)
    check_sampling(body)
    stop = stop_strings(body.stop)
    spec = prompts(state, body)
    check_fits(state, len(spec.token_ids) * body.n)
    subs = submissions(state, body, spec, stop, arrival)
    admit(state, len(subs))
    echo = None if spec.echo_texts is None else [
        (text, ids) for text, ids in zip(spec.echo_texts, spec.token_ids, strict=True)
        for _ in range(body.n)]
    gen = Generation(state, subs, stop, spec.num_tokens, echo=echo,
                     prompt_only=spec.prompt_only)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(request, gen, body.stream, bodies(model, gen, include_usage))


def encode(state: ServerState, prompt: str | list[int], param: str) -> list[int]:
    """A prompt's token ids (text is tokenized, ids pass as they are); never empty."""
    if isinstance(prompt, str):
        try:
            return state.engine.encode_prompt(prompt, param)
        except InvalidRequestError as e:
            raise OpenAIError(400, str(e), e.param) from None
    ids = list(prompt)
    if not ids:
        raise OpenAIError(400, f"{param} is empty", param)
    return ids


def submissions(state: ServerState, body: GenerateRequest, prompts: Prompts,
                stop: tuple[str, ...], arrival: float) -> list[Submission]:
    """One validated engine request per choice: ``n`` per prompt, choice ``j`` seeded
    ``seed + j``, with the request's SLOs or the server's defaults (in seconds)."""
    settings = state.settings
    ttft = body.slo_ttft_ms if body.slo_ttft_ms is not None else settings.slo_ttft_ms
    tpot = body.slo_tpot_ms if body.slo_tpot_ms is not None else settings.slo_tpot_ms
    try:
        logit_bias = body.logit_bias_pairs()
    except ValueError as e:
        raise OpenAIError(400, str(e), "logit_bias") from None
    subs = []
    for ids in prompts.token_ids:
        max_tokens = fit_max_tokens(prompts.max_tokens, len(ids), state.max_model_len,
                                    prompts.param)
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % 2**32
            try:
                sampling = SamplingParams(max_tokens=max_tokens,
                                          temperature=body.temperature, top_p=body.top_p,
                                          top_k=max(body.top_k, 0), seed=seed, stop=stop,
                                          ignore_eos=body.ignore_eos,
                                          logprobs=body.requested_logprobs(),
                                          prompt_logprobs=(body.requested_logprobs()
                                                           if prompts.echo_texts is not None
                                                           else None),
                                          min_p=body.min_p, logit_bias=logit_bias,
                                          stop_token_ids=tuple(body.stop_token_ids or ()),
                                          **body.penalties())
                state.engine.encode_and_validate(ids, sampling)
            except InvalidRequestError as e:
                param = _SERVER_PARAMS.get(e.param, e.param)
                if param == "logprobs" and isinstance(body, ChatCompletionRequest):
                    param = "top_logprobs"  # chat's count of alternatives
                raise OpenAIError(400, str(e), param) from None
            subs.append(Submission(new_id("req"), ids, sampling, arrival,
                                   None if ttft is None else ttft / 1000.0,
                                   None if tpot is None else tpot / 1000.0))
    return subs
