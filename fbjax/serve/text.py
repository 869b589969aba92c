"""Text for the server: incremental detokenization with stop-string hold-back.

Chat templates live in :mod:`fbjax.model.chat_template`.

**Streaming text.** Token ids arrive one step at a time, but a token is not a
character: a byte-level tokenizer cuts multi-byte UTF-8 characters, and sentencepiece
style tokenizers change a token's text with its left context (leading spaces).
:class:`IncrementalText` decodes a window of recent tokens (vLLM's prefix/read
offsets), emits only text that the next token cannot change (nothing that ends in a
U+FFFD replacement character that a later byte could still complete), and holds back
any tail that could be the start of a
stop string, so a stop string never leaks into the stream. At the end
:meth:`IncrementalText.finish` emits whatever is left of the engine's final text (cut
at the stop string), so the concatenated stream equals the non-streamed text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fbjax.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    """The streamed text of one choice (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # decoded text that later tokens cannot change
        self.sent = 0  # characters already emitted
        self._sent_text = ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new token ids; return the text that is now safe to emit (maybe empty)."""
        self._ids.extend(token_ids)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset])
        full = decode(self._ids[self._prefix_offset:])
        visible = self.text
        if len(full) > len(prefix):
            if not full.endswith(REPLACEMENT_CHAR):
                self.text = visible = self.text + full[len(prefix):]
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            else:
                # Only the last replacement character may still turn into a character
                # (an incomplete sequence); bytes before it that are invalid stay so.
                visible = self.text + full[len(prefix):-1]
        end = len(visible) - self._stop_hold(visible)
        if end <= self.sent:
            return ""
        delta, self.sent, self._sent_text = visible[self.sent:end], end, visible[:end]
        return delta

    def _stop_hold(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        hold = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text (cut at a stop string) after what was sent."""
        if not final_text.startswith(self._sent_text):
            log.warning("streamed text diverged from the final text; sending the tail only")
        delta = final_text[self.sent:]
        self.sent = max(self.sent, len(final_text))
        return delta
