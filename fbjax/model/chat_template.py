"""A model's chat template: chat messages to one prompt string.

A Hugging Face model directory's own Jinja template
(``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja``), or a GGUF
file's ``tokenizer.chat_template``, renders chat messages, in a sandbox as
``transformers`` does. The built-in model (and an HF
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
from pathlib import Path

from fbjax.catalog import resolve_model
from fbjax.model.gguf import is_gguf_file
from fbjax.model.gguf_tokenizer import gguf_chat_template
from fbjax.model.tokenizer import special_token_from_config

log = logging.getLogger(__name__)

SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


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
        """``override`` (a template file), else the model's template (an HF directory's,
        or a GGUF file's ``tokenizer.chat_template``), else the simple documented one.
        ``model_dir`` may also be a known model name (:mod:`fbjax.catalog`)."""
        model_dir = resolve_model(model_dir)
        source, bos, eos, where = None, "", "", ""
        if model_dir is not None and is_gguf_file(model_dir):
            source, bos, eos = gguf_chat_template(model_dir)
            where = "its GGUF metadata (tokenizer.chat_template)"
        elif model_dir is not None:
            d = Path(model_dir)
            bos = special_token_from_config(d, "bos_token") or ""
            eos = special_token_from_config(d, "eos_token") or ""
            if override is None:
                source = _model_template(d)
            where = "chat_template.jinja or tokenizer_config.json"
        if override is not None:
            return cls(Path(override).read_text(), bos, eos, name=str(override))
        if source is not None:
            return cls(source, bos, eos, name=f"{model_dir} chat template")
        if model_dir is not None:
            log.warning("%s: no chat template in %s; using the simple one (pass a template "
                        "file to override)", model_dir, where)
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
