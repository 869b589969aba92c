"""Text for the server: incremental detokenization with stop-string hold-back, and chat
templates.

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

**Chat templates.** A Hugging Face model directory's own Jinja template
(``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja``) renders
chat messages, in a sandbox as ``transformers`` does. The built-in model (and an HF
model without a template) uses :data:`SIMPLE_CHAT_TEMPLATE`::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

one ``<|role|>`` line then the content and a newline per message, ending with
``<|assistant|>`` and a newline for the reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from fbjax.model.tokenizer import Tokenizer, special_token_from_config

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"

SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


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


class ChatTemplate:
    """Renders chat messages to a prompt string with a Jinja chat template."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 name: str = "simple") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        self.template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name

    @classmethod
    def for_model(cls, model_dir: str | None, override: str | None = None) -> ChatTemplate:
        """``override`` (a template file), else the model directory's template, else the
        simple documented one."""
        bos = eos = ""
        if model_dir is not None:
            d = Path(model_dir)
            bos = special_token_from_config(d, "bos_token") or ""
            eos = special_token_from_config(d, "eos_token") or ""
        if override is not None:
            return cls(Path(override).read_text(), bos, eos, name=str(override))
        if model_dir is not None:
            source = _model_template(Path(model_dir))
            if source is not None:
                return cls(source, bos, eos, name=f"{model_dir} chat template")
            log.warning("%s has no chat template; using the simple one", model_dir)
        return cls(SIMPLE_CHAT_TEMPLATE, bos, eos)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text; jinja2.TemplateError if the template refuses the messages."""
        return self.template.render(messages=messages, add_generation_prompt=True,
                                    bos_token=self.bos_token, eos_token=self.eos_token)


def _model_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        value = json.loads((model_dir / "tokenizer_config.json").read_text()).get(
            "chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None
