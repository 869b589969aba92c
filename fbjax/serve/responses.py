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

from fbjax.sched.request import TokenLogprob
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
        choice = self.chunk_choice(index, delta, reason)
        if self.gen.wants_logprobs(index):
            choice["logprobs"] = self.logprobs(self.gen.take_logprobs(index))
        return self._body(self.CHUNK_OBJECT, [choice])

    def usage_chunk(self) -> Body:
        return self._body(self.CHUNK_OBJECT, [], self.gen.usage())

    def final(self) -> Body:
        pairs = zip(self.gen.final_texts, self.gen.finish_reasons, strict=True)
        choices = [self.final_choice(i, text, reason) for i, (text, reason) in enumerate(pairs)]
        for i, choice in enumerate(choices):
            if self.gen.wants_logprobs(i):
                choice["logprobs"] = self.logprobs(self.gen.logprobs[i])
        return self._body(self.OBJECT, choices, self.gen.usage())

    def logprobs(self, tokens: list[TokenLogprob]) -> Body:
        """The ``logprobs`` of a choice (or of a chunk's tokens) in the endpoint's format."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """A token's own text (a partial UTF-8 character shows as U+FFFD, as in vLLM)."""
        return self.gen.state.tokenizer.decode([token_id])

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
        if self.gen.echo is not None:
            text = self.gen.echo[index][0] + text
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def final(self) -> Body:
        body = super().final()
        if self.gen.echo is None:
            return body
        for i, choice in enumerate(body["choices"]):
            generated = choice["logprobs"]
            if generated is None:
                continue
            # The prompt's tokens come first; its first token has no log-probability.
            prompt_text, prompt_ids = self.gen.echo[i]
            first = self.token_text(prompt_ids[0])
            prompt = self.logprobs(self.gen.prompt_logprobs[i] or [])
            choice["logprobs"] = {
                "tokens": [first, *prompt["tokens"], *generated["tokens"]],
                "token_logprobs": [None, *prompt["token_logprobs"],
                                   *generated["token_logprobs"]],
                "top_logprobs": [None, *prompt["top_logprobs"], *generated["top_logprobs"]],
                "text_offset": [0, *(o + len(first) for o in prompt["text_offset"]),
                                *(o + len(prompt_text) for o in generated["text_offset"])]}
        return body

    def logprobs(self, tokens: list[TokenLogprob]) -> Body:
        """OpenAI's legacy format: per token its text, log-probability, the top
        alternatives with the sampled token among them (up to ``logprobs + 1``, as
        OpenAI and vLLM), and its character offset in the choice's text."""
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        top = []
        for text, t in zip(texts, tokens, strict=True):
            alternatives = {self.token_text(i): lp for i, lp in t.top}
            alternatives.setdefault(text, t.logprob)
            top.append(alternatives)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top, "text_offset": offsets}


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

    def logprobs(self, tokens: list[TokenLogprob]) -> Body:
        """The chat format: per token its text, UTF-8 bytes, log-probability and
        ``top_logprobs`` alternatives."""
        def entry(token_id: int, logprob: float) -> Body:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token_id, t.logprob),
                             "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}
