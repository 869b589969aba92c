"""The OpenAI wire format: pydantic models for requests and responses, and error bodies.

Requests accept what the official client sends. Fields fbjax cannot honour
(``suffix``, ``tools``...) are
accepted at their neutral value and refused with a 400 naming the field otherwise,
rather than silently ignored. Unknown fields are ignored, as OpenAI does.

Extra fields beyond OpenAI's, as vLLM names them: ``top_k`` (0 or -1 disables it),
``min_p``, ``repetition_penalty`` (1 is off), ``stop_token_ids``, ``ignore_eos``, and
per-request SLO overrides ``slo_ttft_ms`` / ``slo_tpot_ms`` (the scheduler's deadlines for this
request; defaults come from ``--slo_ttft_ms`` / ``--slo_tpot_ms``).

Seeds may be any 64-bit integer (the client's range); the engine uses ``seed mod
2**32``, and choice ``i`` of an ``n > 1`` request uses ``seed + i``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request; more is refused with a 400
MAX_STOP = 16  # stop strings per request


class _Strict(BaseModel):
    # Types as OpenAI's API has them: "10" or true is not a token count, 1.5 is not n
    # (strict mode; an integer still stands for a float). NaN and infinities are not
    # numbers a client means; refuse them at parse time.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields common to completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # extra, as vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extra, as vLLM
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extra: keep generating past EOS (benchmarks with fixed output lengths, as vLLM).
    ignore_eos: bool = False
    # Extra: per-request SLO overrides (milliseconds).
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    presence_penalty: float | None = None  # None: 0
    frequency_penalty: float | None = None  # None: 0
    repetition_penalty: float | None = None  # extra, as vLLM; None: 1 (off)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to something fbjax does not implement."""
        return []

    def penalties(self) -> dict[str, float]:
        """The penalty fields as SamplingParams takes them (null is the neutral value)."""
        return {"presence_penalty": self.presence_penalty or 0.0,
                "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": (1.0 if self.repetition_penalty is None
                                       else self.repetition_penalty)}

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs; its keys are token ids as strings
        (OpenAI's JSON). A key that is no integer is a ValueError naming it."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys are token ids, got {key!r}") from None
            pairs.append((token, bias))
        return tuple(pairs)


class CompletionRequest(_SamplingFields):
    # One prompt (text or token ids) or a batch of them.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for the legacy completions API
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def requested_logprobs(self) -> int | None:
        """Alternatives per token the client asked for (None: no logprobs)."""
        return self.logprobs

    def unsupported(self) -> list[tuple[str, str]]:
        bad = super().unsupported()
        if self.suffix:
            bad.append(("suffix", "suffix is not supported"))
        if self.best_of is not None and self.best_of != self.n:
            bad.append(("best_of", "best_of is not supported (only best_of == n)"))
        return bad


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def requested_logprobs(self) -> int | None:
        """Alternatives per token the client asked for (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> list[tuple[str, str]]:
        bad = super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            bad.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.tools:
            bad.append(("tools", "tools are not supported"))
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            bad.append(("response_format", "only response_format {'type': 'text'} is "
                                           "supported"))
        return bad


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts prompt
    tokens served from the prefix cache, as OpenAI reports its own prompt caching."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def model_card(name: str, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fbjax",
            "max_model_len": max_model_len}
