"""Prompt length as the router counts it, for the Prefill Admission Budget.

The router tokenizes with the replicas' tokenizer and chat template (no model weights,
no JAX), so its count is the prompt length the replica's scheduler will see. A body
the router cannot read counts 0 tokens: the replica validates it and answers the
client's 4xx, the router does not second-guess it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fbjax.model.chat_template import ChatTemplate
from fbjax.model.gguf import is_gguf_file
from fbjax.model.gguf_tokenizer import gguf_tokenizer
from fbjax.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def prompt_token_counter(model_dir: str | None,
                         chat_template: str | None = None) -> Callable[[str, dict[str, Any]], int]:
    """``count(path, body)``: prompt tokens of every choice the request asks for."""
    tokenizer: Tokenizer
    if model_dir is None:
        tokenizer = ByteTokenizer()
    elif is_gguf_file(model_dir):
        tokenizer = gguf_tokenizer(model_dir)
    else:
        tokenizer = HFTokenizer.from_dir(model_dir)
    template = ChatTemplate.for_model(model_dir, chat_template)

    def one(prompt: Any) -> int:
        if isinstance(prompt, str):
            return len(tokenizer.encode(prompt))
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return 0

    def count(path: str, body: dict[str, Any]) -> int:
        n = body.get("n", 1)
        choices = n if isinstance(n, int) and n > 0 else 1
        try:
            if path.endswith("/chat/completions"):
                return choices * len(tokenizer.encode(template.render(body["messages"])))
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not all(isinstance(t, int)
                                                               for t in prompt):
                return choices * sum(one(p) for p in prompt)
            return choices * one(prompt)
        except Exception:  # noqa: BLE001 - any unreadable body: the replica's 4xx says why
            return 0

    return count
