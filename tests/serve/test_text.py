"""Incremental detokenization and chat templates, without a server."""

from __future__ import annotations

import pytest

from fbjax.model.chat_template import ChatTemplate
from fbjax.model.tokenizer import ByteTokenizer
from fbjax.serve.text import IncrementalText

TOK = ByteTokenizer()


def stream(ids, stop=(), final=None):
    text = IncrementalText(TOK, stop)
    deltas = [text.add([i]) for i in ids]
    deltas.append(text.finish(TOK.decode(ids) if final is None else final))
    return deltas


def test_multibyte_characters_are_never_split():
    ids = list("a€b😀".encode())
    deltas = stream(ids)
    assert "".join(deltas) == "a€b😀"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:5] == ["a", "", "", "€", "b"]


def test_invalid_bytes_are_emitted_not_held_forever():
    ids = [0x80, 0x80, 0x80, ord("x"), 0xE2]
    deltas = stream(ids)
    assert "".join(deltas) == TOK.decode(ids)
    assert deltas[1] == "\ufffd"  # the first bad byte is known bad once another follows


@pytest.mark.parametrize("stop", ["cd", "xyz", "d"])
def test_stop_string_prefix_is_held_back(stop):
    ids = list(b"abcdef")
    full = TOK.decode(ids)
    cut = full[:full.find(stop)] if stop in full else full
    text = IncrementalText(TOK, (stop,))
    emitted = ""
    for n in range(1, len(ids) + 1):
        if stop in TOK.decode(ids[:n]):
            break  # the engine finishes the request here: its final event has the text
        emitted += text.add([ids[n - 1]])
        assert stop not in emitted and cut.startswith(emitted)
    emitted += text.finish(cut)
    assert emitted == cut


def test_simple_chat_template_is_documented_format():
    t = ChatTemplate.for_model(None)
    text = t.render([{"role": "system", "content": "Be terse."},
                     {"role": "user", "content": "Hi!"}])
    assert text == "<|system|>\nBe terse.\n<|user|>\nHi!\n<|assistant|>\n"


def test_model_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}'
        '[{{ m.role }}] {{ m.content }}{% endfor %}"}')
    t = ChatTemplate.for_model(str(tmp_path))
    assert t.render([{"role": "user", "content": "yo"}]) == "<s>[user] yo"
