"""``POST /v1/completions``: one prompt or a batch, as text or token ids."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fbjax.serve.protocol import CompletionRequest
from fbjax.serve.responses import CompletionBodies
from fbjax.serve.routes.generate import Prompts, encode, generate
from fbjax.serve.state import ServerState, StateDep
from fbjax.web.errors import OpenAIError

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Response:
    return await generate(request, state, body, completion_prompts, CompletionBodies)


def completion_prompts(state: ServerState, body: CompletionRequest) -> Prompts:
    """The body's prompts; without ``max_tokens``, OpenAI's default of 16 within what
    the context leaves the longest prompt. With ``echo`` each choice's text (and its
    logprobs) starts with its prompt's; ``max_tokens: 0`` then answers with the prompt
    alone (how evaluation harnesses score a text)."""
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise OpenAIError(400, "prompt is empty", "prompt")
    prompts = [encode(state, p, "prompt") for p in raw]
    requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
    if requested is None:
        requested = max(1, min(16, state.max_model_len - max(map(len, prompts))))
    if not body.echo:
        return Prompts(prompts, requested, "max_tokens")
    if body.stream:
        raise OpenAIError(400, "echo is not supported with stream; send stream: false",
                          "echo")
    texts = [p if isinstance(p, str) else state.tokenizer.decode(ids)
             for p, ids in zip(raw, prompts, strict=True)]
    if requested == 0:
        return Prompts(prompts, 1, "max_tokens", texts, prompt_only=True)
    return Prompts(prompts, requested, "max_tokens", texts)
