"""ByteTokenizer and HFTokenizer (on a tiny tokenizer.json built here, nothing downloaded)."""

from __future__ import annotations

import pytest

from fbjax.config import ConfigError
from fbjax.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


@pytest.mark.parametrize("text", ["", "hello, world", "héllo wörld ✓", "日本語 🚀\n\ttab",
                                  "\x00 nul"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials_and_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.eos_token_ids == (257,)
    assert ByteTokenizer(add_bos=False).encode("a") == [97]
    # Specials and ids a random model may emit past the byte range are skipped.
    assert tok.decode([256, 104, 105, 257, 300]) == "hi"
    # A multi-byte character cut in half decodes to U+FFFD instead of raising.
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"
    assert isinstance(tok, Tokenizer)
    with pytest.raises(ConfigError):
        ByteTokenizer(vocab_size=100)


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog",
              "fair batching schedules prefill and decode tokens",
              "héllo wörld, ünïcödé text"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_hf_tokenizer_round_trip(tokenizer_dir):
    tok = HFTokenizer(tokenizer_dir / "tokenizer.json", eos_token_ids=[2], bos_token_id=1)
    assert isinstance(tok, Tokenizer)
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1
    assert tok.vocab_size <= 300
    for text in ["the quick brown fox", "héllo wörld", "unseen words ✓ too"]:
        ids = tok.encode(text)
        assert ids[0] == tok.token_to_id("<s>")  # from the post-processor
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text  # <s> skipped as a special token
    assert tok.decode(tok.encode("the dog") + [tok.token_to_id("</s>")]) == "the dog"


def test_hf_tokenizer_from_dir_reads_eos_from_tokenizer_config(tokenizer_dir):
    (tokenizer_dir / "tokenizer_config.json").write_text(
        '{"eos_token": {"content": "</s>", "special": true}}')
    tok = HFTokenizer.from_dir(tokenizer_dir)
    assert tok.eos_token_ids == (tok.token_to_id("</s>"),)
    # An EOS from the model config wins.
    assert HFTokenizer.from_dir(tokenizer_dir, eos_token_ids=[7]).eos_token_ids == (7,)


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer file not found: .*tokenizer\.json"):
        HFTokenizer.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        HFTokenizer(tmp_path)  # a directory means its tokenizer.json


def test_hf_tokenizer_corrupt_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"tokenizer\.json: cannot load tokenizer"):
        HFTokenizer(tmp_path / "tokenizer.json")
