"""Tokenizers: a byte-level one for the built-in model and a wrapper for HF tokenizer.json.

The engine and the server only need text <-> ids and the special ids that end or
start a sequence, so both sit behind the small :class:`Tokenizer` protocol. The
built-in model must run on a fresh machine with nothing downloaded, hence
:class:`ByteTokenizer`, which needs no vocabulary file at all. Real checkpoints ship a
``tokenizer.json`` that the Rust ``tokenizers`` library reads directly (no
``transformers`` import at serve time), hence :class:`HFTokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fbjax.config import ConfigError


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer.

    ``encode`` returns the ids the model is fed (special tokens such as BOS included
    where the tokenizer adds them); ``decode`` drops special tokens so that streamed
    text never shows ``<eos>``-like markers.
    """

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus BOS (256) and EOS (257).

    Every string round-trips exactly and the vocabulary needs no file, which is what the
    built-in random-weight model needs (its ``vocab_size`` of 320 leaves room for these
    258 ids). ``decode`` skips ids >= 256 (specials, and ids a random model may emit
    beyond the byte range) and replaces invalid UTF-8 (a multi-byte character cut in
    the middle by a stream) with U+FFFD instead of raising.
    """

    BOS = 256
    EOS = 257

    def __init__(self, vocab_size: int = 258, add_bos: bool = True) -> None:
        if vocab_size < 258:
            raise ConfigError(f"ByteTokenizer needs vocab_size >= 258, got {vocab_size}")
        self.vocab_size = vocab_size
        self.add_bos = add_bos
        self.bos_token_id: int | None = self.BOS
        self.eos_token_ids: tuple[int, ...] = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8",
                                                                     errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library.

    The post-processor in ``tokenizer.json`` decides whether BOS is added on encode (as
    ``transformers`` would); ``decode`` skips special tokens. ``eos_token_ids`` and
    ``bos_token_id`` come from the model config (the tokenizer file does not say which
    special token ends a turn), so the caller passes them in. :meth:`wrap` takes a
    tokenizer built in memory instead (from a GGUF file's metadata).
    """

    def __init__(
        self,
        path: str | Path,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
    ) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path} (an HF model directory "
                              "needs a tokenizer.json)")
        try:
            tok = _RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ConfigError(f"{path}: cannot load tokenizer: {e}") from None
        self._init(tok, path, eos_token_ids, bos_token_id)

    def _init(self, tok: Any, path: Path, eos_token_ids: Sequence[int],
              bos_token_id: int | None) -> None:
        self._tok = tok
        self.path = path
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.bos_token_id = bos_token_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def wrap(cls, tok: Any, source: str | Path, eos_token_ids: Sequence[int] = (),
             bos_token_id: int | None = None) -> HFTokenizer:
        """An in-memory ``tokenizers.Tokenizer``; ``source`` names where it came from."""
        self = cls.__new__(cls)
        self._init(tok, Path(source), eos_token_ids, bos_token_id)
        return self

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
    ) -> HFTokenizer:
        """The tokenizer of an HF model directory; falls back to ``tokenizer_config.json``
        for the EOS token when the model config names none."""
        model_dir = Path(model_dir)
        tok = cls(model_dir / "tokenizer.json", eos_token_ids, bos_token_id)
        if not tok.eos_token_ids:
            eos = special_token_from_config(model_dir, "eos_token")
            if eos is not None and tok._tok.token_to_id(eos) is not None:
                tok.eos_token_ids = (tok._tok.token_to_id(eos),)
        return tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def special_token_from_config(model_dir: Path, key: str) -> str | None:
    path = model_dir / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
