"""OpenAI response bodies: the final JSON and the stream chunks of ``/v1/completions``
and ``/v1/chat/completions``.

The two endpoints share the envelope (``id``, ``object``, ``created``, ``model``,
``choices``, ``usage``) and when ``usage`` appears: in the final body always, in chunks
as ``null`` when the client asked for ``stream_options.include_usage`` (and then a last
chunk with no choices carries it). They differ in the ``object`` names, the id prefix,
the choice shapes, and chat's opening chunks that announce each choice's role; a
subclass gives only those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fbjax.serve.generation import Generation
from fbjax.serve.protocol import new_id, now_s

Body = dict[str, Any]


@dataclasses.dataclass
class ResponseBodies:
    """The bodies of one response; ``gen`` supplies final texts, reasons and usage."""

    ID_PREFIX: ClassVar[str]
    OBJECT: ClassVar[str]  # the final body's ``object``
    CHUNK_OBJECT: ClassVar[str]  # a stream chunk's ``object``

    model: str
    gen: Generation
    include_usage: bool = False  # stream_options.include_usage
    id: str = ""
    created: int = dataclasses.field(default_factory=now_s)

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.ID_PREFIX)

    def opening(self) -> list[Body]:
        """Chunks sent before any text."""
        return []

    def chunk(self, index: int, delta: str, reason: str | None) -> Body:
        return self._body(self.CHUNK_OBJECT, [self.chunk_choice(index, delta, reason)])

    def usage_chunk(self) -> Body:
        return self._body(self.CHUNK_OBJECT, [], self.gen.usage())

    def final(self) -> Body:
        pairs = zip(self.gen.final_texts, self.gen.finish_reasons, strict=True)
        choices = [self.final_choice(i, text, reason) for i, (text, reason) in enumerate(pairs)]
        return self._body(self.OBJECT, choices, self.gen.usage())

    def chunk_choice(self, index: int, delta: str, reason: str | None) -> Body:
        raise NotImplementedError

    def final_choice(self, index: int, text: str, reason: str | None) -> Body:
        raise NotImplementedError

    def _body(self, obj: str, choices: list[Body], usage: Body | None = None) -> Body:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage or usage is not None:
            out["usage"] = usage
        return out


class CompletionBodies(ResponseBodies):
    ID_PREFIX = "cmpl"
    OBJECT = CHUNK_OBJECT = "text_completion"

    def chunk_choice(self, index: int, delta: str, reason: str | None) -> Body:
        return self.final_choice(index, delta, reason)

    def final_choice(self, index: int, text: str, reason: str | None) -> Body:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


class ChatBodies(ResponseBodies):
    ID_PREFIX = "chatcmpl"
    OBJECT = "chat.completion"
    CHUNK_OBJECT = "chat.completion.chunk"

    def opening(self) -> list[Body]:
        """One chunk per choice with ``role: assistant`` and empty content, as OpenAI."""
        return [self._body(self.CHUNK_OBJECT, [self._choice(i, "delta", {"role": "assistant",
                                                                         "content": ""}, None)])
                for i in range(self.gen.num_choices)]

    def chunk_choice(self, index: int, delta: str, reason: str | None) -> Body:
        return self._choice(index, "delta", {"content": delta} if delta else {}, reason)

    def final_choice(self, index: int, text: str, reason: str | None) -> Body:
        return self._choice(index, "message", {"role": "assistant", "content": text}, reason)

    @staticmethod
    def _choice(index: int, key: str, content: Body, reason: str | None) -> Body:
        return {"index": index, key: content, "logprobs": None, "finish_reason": reason}
