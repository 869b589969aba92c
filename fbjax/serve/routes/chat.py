"""``POST /v1/chat/completions``: the messages through the model's chat template."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fbjax.serve.protocol import ChatCompletionRequest
from fbjax.serve.responses import ChatBodies
from fbjax.serve.routes.generate import Prompts, encode, generate
from fbjax.serve.state import ServerState, StateDep
from fbjax.web.errors import OpenAIError

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: StateDep) -> Response:
    return await generate(request, state, body, chat_prompt, ChatBodies)


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> Prompts:
    """The rendered conversation as one prompt; ``max_completion_tokens`` wins over the
    older ``max_tokens``."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = state.chat_template.render(messages)
    except Exception as e:  # jinja2.TemplateError and whatever the template raises
        raise OpenAIError(400, f"the chat template refused the messages: {e}",
                          "messages") from None
    ids = encode(state, text, "messages")
    bos = state.tokenizer.bos_token_id
    if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
        ids = ids[1:]  # the template wrote BOS and the tokenizer added another
    if body.max_completion_tokens is not None:
        return Prompts([ids], body.max_completion_tokens, "max_completion_tokens")
    return Prompts([ids], body.max_tokens, "max_tokens")
