"""One HTTP request's engine requests (one per choice) and their text as it streams in.

It turns the engine loop's per-request :class:`Event` s into per-choice text deltas
(stop strings cut, incomplete UTF-8 held back) and keeps what the final body and the
usage need, so the response code never sees token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fbjax.sched.request import InvalidRequestError, TokenLogprob
from fbjax.serve.engine_loop import EngineFailedError, Event, Submission
from fbjax.serve.protocol import usage
from fbjax.serve.state import ServerState
from fbjax.serve.text import IncrementalText
from fbjax.serve.validation import engine_failed
from fbjax.web.errors import OpenAIError


class EngineRequestError(RuntimeError):
    """The engine failed this request (a failed step, or the engine itself failed)."""


class Generation:
    """The engine requests behind one HTTP request, and their streamed text."""

    def __init__(self, state: ServerState, submissions: list[Submission],
                 stop: tuple[str, ...], prompt_tokens: int, *,
                 echo: list[tuple[str, list[int]]] | None = None,
                 prompt_only: bool = False) -> None:
        self.state = state
        # Per choice, its prompt's text and ids when the client asked for ``echo``;
        # ``prompt_only``: the sampled token is not part of the answer (max_tokens 0).
        self.echo = echo
        self.prompt_only = prompt_only
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * len(submissions)
        self.submissions = submissions
        self.texts = [IncrementalText(state.tokenizer, stop) for _ in submissions]
        self.finish_reasons: list[str | None] = [None] * len(submissions)
        self.final_texts = [""] * len(submissions)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0  # the most any choice found in the prefix cache
        # Per choice that asked for them: every token's log-probabilities so far, and how
        # many of them a stream chunk has carried (``take_logprobs``).
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in submissions]
        self._logprobs_sent = [0] * len(submissions)
        self._events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._added: list[str] = []

    @property
    def num_choices(self) -> int:
        return len(self.submissions)

    def wants_logprobs(self, choice: int) -> bool:
        return self.submissions[choice].sampling.logprobs is not None

    def take_logprobs(self, choice: int) -> list[TokenLogprob]:
        """The choice's log-probabilities no stream chunk has carried yet: a chunk carries
        those of every token since the previous one, so each token's are sent once even
        when its text is held back (an incomplete character, a possible stop string)."""
        new = self.logprobs[choice][self._logprobs_sent[choice]:]
        self._logprobs_sent[choice] = len(self.logprobs[choice])
        return new

    async def start(self) -> None:
        """Hand every choice to the engine; all or nothing."""
        try:
            for i, sub in enumerate(self.submissions):
                await self.state.loop.add(sub, lambda ev, i=i: self._events.put_nowait((i, ev)))
                self._added.append(sub.request_id)
        except InvalidRequestError as e:
            self.abort()
            raise OpenAIError(400, str(e), e.param) from None
        except EngineFailedError as e:
            self.abort()
            raise engine_failed(e) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Abort every choice that has not finished (the client is gone)."""
        for i, sub in enumerate(self.submissions):
            if self.finish_reasons[i] is None and sub.request_id in self._added:
                self.state.loop.abort(sub.request_id)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    async def deltas(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason or None) until every choice is done."""
        while not self.done:
            i, ev = await self._events.get()
            if ev.error is not None:
                self.finish_reasons[i] = "error"
                raise EngineRequestError(ev.error)
            text = self.texts[i]
            if ev.logprobs:
                self.logprobs[i].extend(ev.logprobs)
            if ev.final is None:
                delta = text.add(ev.new_token_ids)
                if delta:
                    yield i, delta, None
                continue
            delta = text.finish(ev.final.text)  # the final text, cut at a stop string
            self.final_texts[i] = "" if self.prompt_only else ev.final.text
            self.finish_reasons[i] = "length" if self.prompt_only else ev.final.finish_reason
            self.prompt_logprobs[i] = ev.final.prompt_logprobs
            if self.prompt_only:
                self.logprobs[i] = []
            else:
                self.completion_tokens += len(ev.final.token_ids)
            self.cached_tokens = max(self.cached_tokens, ev.final.num_cached_tokens)
            yield i, delta, ev.final.finish_reason

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens,
                     min(self.cached_tokens, self.prompt_tokens))
