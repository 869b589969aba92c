"""Tokenizers and chat templates rebuilt from a GGUF file's metadata.

A GGUF file has no ``tokenizer.json``: its vocabulary, merges, token types and special
ids are metadata (``tokenizer.ggml.*``). They are turned into a ``tokenizers.Tokenizer``
that behaves as llama.cpp's tokenizer for that file and wrapped in the same
:class:`~fbjax.model.tokenizer.HFTokenizer` an HF directory gets. ``transformers`` has
such a converter, but it is a test-only dependency: serving never imports it.

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges; the text
  is split before BPE the way llama.cpp splits it for ``tokenizer.ggml.pre`` (Llama 3,
  Qwen2, SmolLM/StarCoder digits, GPT-2, ...).
* ``"llama"``: SentencePiece-style BPE over ``▁``-spaced text with ``<0xXX>`` byte
  fallback; merges come from the file or, as llama.cpp does, from the token scores.

Tokens typed control or unknown, and the BOS/EOS/EOT/padding/unknown tokens, are special
(matched whole, skipped when decoding); user-defined ones are matched whole but decoded.
``tokenizer.ggml.add_bos_token``/``add_eos_token`` decide what ``encode`` adds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fbjax.config import ConfigError
from fbjax.model.gguf import GGUFFile, gguf_eos_token_ids, open_gguf
from fbjax.model.tokenizer import HFTokenizer

log = logging.getLogger(__name__)

# llama.cpp's token types (``tokenizer.ggml.token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of the pre-tokenizers llama.cpp knows (as in the models' tokenizer.json).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+"
                 rf"{_LOWER}*|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?|\p{{N}}{{1,3}}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT,
           "gpt4o": _GPT4O_SPLIT}

# tokenizer.ggml.pre -> (split style, ignore_merges, BOS added by default), after
# llama.cpp's llama_vocab::load: "digits" is GPT-2's split after isolating every digit.
_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), ("llama3", True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ("llama3", False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"),
                    ("qwen2", False, False)),
    "tekken": ("tekken", True, True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie"), ("gpt4o", False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), ("digits", False, False)),
    **dict.fromkeys(("default", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion",
                     "exaone4", "granite-docling"), ("gpt2", False, False)),
}


def gguf_tokenizer(model: str | Path | GGUFFile) -> HFTokenizer:
    """The tokenizer a GGUF file describes, stopping on its EOS/EOT/EOM ids."""
    f = model if isinstance(model, GGUFFile) else open_gguf(model)
    return HFTokenizer.wrap(build_gguf_tokenizer(f), f.path, gguf_eos_token_ids(f),
                            f.get("tokenizer.ggml.bos_token_id", None))


def gguf_chat_template(model: str | Path | GGUFFile) -> tuple[str | None, str, str]:
    """``(tokenizer.chat_template or None, BOS token text, EOS token text)``."""
    f = model if isinstance(model, GGUFFile) else open_gguf(model)
    template = f.get("tokenizer.chat_template", None)
    tokens = f.get("tokenizer.ggml.tokens", [])

    def text(name: str) -> str:
        i = f.get(f"tokenizer.ggml.{name}_token_id", None)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    return (template if isinstance(template, str) else None), text("bos"), text("eos")


def build_gguf_tokenizer(f: GGUFFile) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` (see the module docstring)."""
    from tokenizers import AddedToken, processors

    kind = f.get("tokenizer.ggml.model")
    # llama.cpp renames empty tokens, which no tokenizer can hold, the same way.
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(f.get("tokenizer.ggml.tokens"))]
    types = f.get("tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ConfigError(f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                          f"{len(tokens)} tokens")
    if kind == "gpt2":
        tok, add_bos = _byte_level_bpe(f, tokens, types)
    elif kind == "llama":
        tok, add_bos = _sentencepiece_bpe(f, tokens), True
    else:
        raise ConfigError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported "
                          "(supported: gpt2, llama)")

    ids = {name: f.get(f"tokenizer.ggml.{name}_token_id", None)
           for name in ("bos", "eos", "eot", "eom", "unknown", "padding")}
    for name, i in ids.items():
        if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise ConfigError(f"{f.path}: tokenizer.ggml.{name}_token_id {i!r} is not a token "
                              f"id (the vocabulary has {len(tokens)} tokens)")
    special = {i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL)}
    special |= {i for i in ids.values() if i is not None}
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in sorted(special)])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED and i not in special])

    single, pieces = ["$A"], {}
    for name, default in (("bos", add_bos), ("eos", False)):
        if not f.get(f"tokenizer.ggml.add_{name}_token", default):
            continue
        if ids[name] is None:
            raise ConfigError(f"{f.path}: tokenizer.ggml.add_{name}_token is set but "
                              f"tokenizer.ggml.{name}_token_id is missing")
        token = tokens[ids[name]]
        single = [token, *single] if name == "bos" else [*single, token]
        pieces[token] = ids[name]
    if pieces:
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=list(pieces.items()))
    return tok


def _byte_level_bpe(f: GGUFFile, tokens: list[str], types: list[int]) -> tuple[Any, bool]:
    """GPT-2-style BPE; returns the tokenizer and whether its pre-tokenizer adds BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        log.warning("%s: unknown tokenizer.ggml.pre %r; splitting text as GPT-2 does, which "
                    "may tokenize differently from the model's own tokenizer", f.path, pre)
    style, ignore_merges, add_bos = _PRE_TOKENIZERS.get(pre, ("gpt2", False, False))
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # Vocabulary entries are spelled in the byte alphabet; a stray one in raw UTF-8
        # is respelled (added tokens keep their text: they are matched before BPE).
        if kind not in (CONTROL, USER_DEFINED, UNKNOWN) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = i
    tok = Tokenizer(models.BPE(vocab, _merges(f), dropout=None, fuse_unk=False,
                               byte_fallback=False, ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    if style == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif style in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[style]), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok, add_bos


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str]) -> Any:
    """SentencePiece-style BPE: ``▁`` for spaces (one prepended unless
    ``tokenizer.ggml.add_space_prefix`` is false) and ``<0xXX>`` tokens for bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    if f.has("tokenizer.ggml.merges"):
        merges = _merges(f)
    else:
        scores = f.get("tokenizer.ggml.scores", None)
        if scores is None or len(scores) != len(tokens):
            raise ConfigError(f"{f.path}: a 'llama' tokenizer needs tokenizer.ggml.merges or "
                              "one tokenizer.ggml.scores entry per token")
        merges = merges_from_scores(tokens, scores)
    unk = f.get("tokenizer.ggml.unknown_token_id", None)
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[unk] if isinstance(unk, int)
                               and 0 <= unk < len(tokens) else None))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece tokenizer, which repeatedly
    joins the adjacent pair whose joined token scores highest: every split of a token
    into two tokens, best-scoring result first (ties: longer left part, then id order)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    found: list[tuple[str, str, float]] = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [(token[:k], token[k:]) for k in range(1, len(token))
                  if token[:k] in vocab and token[k:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found += [(left, right, score) for left, right in splits]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _merges(f: GGUFFile) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges``, each ``"left right"`` split at its first inner space
    (as llama.cpp does, so a left part may itself be a space)."""
    merges = []
    for i, merge in enumerate(f.get("tokenizer.ggml.merges")):
        cut = merge.find(" ", 1)
        if cut < 0:
            raise ConfigError(f"{f.path}: tokenizer.ggml.merges[{i}] {merge!r} is not two "
                              "tokens separated by a space")
        merges.append((merge[:cut], merge[cut + 1:]))
    return merges


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the others
    for the characters from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


__all__ = ["build_gguf_tokenizer", "gguf_chat_template", "gguf_tokenizer",
           "merges_from_scores"]
