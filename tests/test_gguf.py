"""GGUF loading (fbjax.model.gguf, fbjax.model.gguf_tokenizer) on small files written here.

* Every supported tensor type round-trips: weights quantized with gguf-py (or, for the
  K-quants gguf-py cannot quantize, random blocks) load as their dequantized values,
  within the type's error of the original weights, with llama.cpp's q/k permutation
  undone. gguf-py's K-quant decoders are checked against transformers' independent ones.
* Tiny HF models (torch) written as GGUF files load into the same logits.
* Bad files fail with a ConfigError naming the field, tensor or file.
* Tokenizers rebuilt from metadata match transformers' GGUF tokenizer; chat templates,
  BOS/EOS and add_bos_token come from the metadata.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fbjax.config import ConfigError
from fbjax.model.chat_template import ChatTemplate
from fbjax.model.gguf import (
    SUPPORTED_TENSOR_TYPES,
    is_gguf_file,
    load_gguf_config,
    load_gguf_params,
    open_gguf,
)
from fbjax.model.gguf_tokenizer import gguf_chat_template, gguf_tokenizer
from fbjax.model.tokenizer import HFTokenizer
from fbjax.model.weights import load_model
from tests.gguf_files import (
    Q,
    gguf_tensors,
    llama3_rope_factors,
    llamacpp_permute,
    model_metadata,
    random_hf_weights,
    write_gguf,
)

# One layer whose every weight row (ggml's fastest dimension) is a multiple of 256, the
# K-quant block size.
SHAPE = dict(vocab=64, hidden=256, inter=256, layers=1, heads=4, kv_heads=2)
META = model_metadata("llama", layers=1, hidden=256, inter=256, heads=4, kv_heads=2)

# Largest dequantization error allowed, relative to the tensor's largest magnitude: half
# a quantization step, with some slack; Q4_0/Q5_0 scale a block by its signed extreme,
# which maps to -8 (-16), so the far end of the block clamps at +7 (+15): a full step.
TOLERANCE = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 120, "Q5_0": 1 / 15, "Q5_1": 1 / 28,
             "Q4_0": 1 / 7, "Q4_1": 1 / 14}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of each K-quant block's float16 scales (d, and dmin where there is one).
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                   "Q6_K": (208,)}


def _tree_get(params, hf_name):
    """The HF tensor ``hf_name`` back from the linen tree, in the HF layout."""
    if hf_name == "model.embed_tokens.weight":
        return np.asarray(params["embed_tokens"]["embedding"])
    if hf_name == "model.norm.weight":
        return np.asarray(params["norm"]["weight"])
    if hf_name == "lm_head.weight":
        return np.asarray(params["lm_head"]["kernel"]).T
    _, _, layer, rest = hf_name.split(".", 3)
    *path, kind = rest.split(".")
    node = params[f"layers_{layer}"]
    for key in path:
        node = node[key]
    if kind == "bias" or "norm" in path[0]:
        return np.asarray(node["bias" if kind == "bias" else "weight"])
    return np.asarray(node["kernel"]).T


def _random_k_blocks(rng, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random bytes of ``rows x cols`` values of K-quant ``kind``, with small finite
    scales (random bytes there would be NaN or huge)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[Q[kind]]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[kind]:
        scales = rng.uniform(1e-3, 1e-2, (rows, cols // block)).astype(np.float16)
        data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


# ---------------------------------------------------------------- tensor types


@pytest.mark.parametrize("kind", [k for k in SUPPORTED_TENSOR_TYPES if k != "F32"])
def test_tensor_type_round_trip(kind, tmp_path):
    """Each type loads as its dequantized values, q/k rows back in HF order."""
    import gguf

    rng = np.random.default_rng(0)
    hf = random_hf_weights(rng, **SHAPE)
    raw = {}
    if kind in K_QUANTS:  # gguf-py cannot quantize these: store random blocks
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
        for hf_name, array in hf.items():
            if array.ndim == 2:
                raw[names.get_name(hf_name, try_suffixes=(".weight",))] = _random_k_blocks(
                    rng, *array.shape, kind)
    tensors = gguf_tensors(hf, "llama", 4, 2, Q[kind], raw)
    path = write_gguf(tmp_path / f"{kind}.gguf", "llama", META, tensors)
    config = load_gguf_config(path)
    params = load_gguf_params(path, config)
    assert open_gguf(path).tensors["blk.0.attn_q.weight"].tensor_type.name == kind
    heads = {"q_proj": 4, "k_proj": 2}
    for hf_name, original in hf.items():
        got = _tree_get(params, hf_name)
        assert got.shape == original.shape, hf_name
        if kind in K_QUANTS and original.ndim == 2:
            name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1).get_name(
                hf_name, try_suffixes=(".weight",))
            stored = gguf.quants.dequantize(raw[name], Q[kind])
            proj = hf_name.split(".")[-2]
            if proj in heads:  # stored rows are permuted: rows[p] holds HF row perm[p]
                perm = llamacpp_permute(np.arange(original.shape[0]), heads[proj])
                stored = stored[np.argsort(perm)]
            np.testing.assert_array_equal(got, stored, err_msg=hf_name)
        else:
            tol = TOLERANCE.get(kind, 0) if original.ndim == 2 else 0
            np.testing.assert_allclose(got, original, rtol=0,
                                       atol=tol * np.abs(original).max(), err_msg=hf_name)


@pytest.mark.parametrize("kind", K_QUANTS + ("Q4_0", "Q4_1", "Q8_0"))
def test_gguf_py_dequantize_matches_transformers(kind):
    """gguf-py's decoders against transformers' (an independent torch implementation)."""
    torch = pytest.importorskip("torch")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    import gguf

    rng = np.random.default_rng(1)
    if kind in K_QUANTS:
        data = _random_k_blocks(rng, 8, 512, kind)
    else:
        data = gguf.quants.quantize(rng.standard_normal((8, 512)).astype(np.float32), Q[kind])
    ours = gguf.quants.dequantize(data, Q[kind])
    theirs = dequant.dequantize(torch.from_numpy(data.reshape(-1).copy()), int(Q[kind]))
    np.testing.assert_allclose(ours.reshape(-1), theirs.numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- HF parity

ARCH_OF = {"llama-untied": "llama", "llama3rope-tied": "llama", "qwen2": "qwen2",
           "mistral-window8": "mistral"}


@pytest.fixture(scope="module", params=sorted(ARCH_OF))
def hf_variant(request, tmp_path_factory):
    """A tiny HF model (test_model_hf_parity's variants) and the GGUF file llama.cpp's
    converter would write for it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.test_model_hf_parity import LLAMA3_ROPE, VARIANTS, build_hf_model

    family, overrides = VARIANTS[request.param]
    model = build_hf_model(family, overrides)
    cfg = model.config
    arch = ARCH_OF[request.param]
    hf = {k: v.detach().numpy() for k, v in model.state_dict().items()
          if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    meta = model_metadata(arch, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                          inter=cfg.intermediate_size, heads=cfg.num_attention_heads,
                          kv_heads=cfg.num_key_value_heads, context=cfg.max_position_embeddings,
                          eps=cfg.rms_norm_eps, theta=cfg.rope_parameters["rope_theta"])
    tensors = gguf_tensors(hf, arch, cfg.num_attention_heads, cfg.num_key_value_heads)
    if "llama3rope" in request.param:
        tensors["rope_freqs.weight"] = llama3_rope_factors(
            cfg.hidden_size // cfg.num_attention_heads, LLAMA3_ROPE["rope_theta"], LLAMA3_ROPE)
    if arch == "mistral":
        meta["mistral.attention.sliding_window"] = cfg.sliding_window
    path = write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", arch, meta,
                      tensors)
    return request.param, model, path


def test_tiny_hf_models_match_through_gguf(hf_variant):
    from tests.test_model_hf_parity import ATOL, PagedRunner, hf_logits

    name, model, path = hf_variant
    config = load_gguf_config(path)
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert config.attention_bias == (name == "qwen2")
    assert config.sliding_window == (8 if name == "mistral-window8" else None)
    assert (config.rope_scaling or {}).get("rope_type") == (
        "freq_factors" if "llama3rope" in name else None)
    params = load_gguf_params(path, config)
    # The permutation is undone exactly, not just closely.
    np.testing.assert_array_equal(params["layers_1"]["self_attn"]["k_proj"]["kernel"],
                                  model.model.layers[1].self_attn.k_proj.weight.detach().T)
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, 20).tolist()
    runner = PagedRunner(config, params)
    np.testing.assert_allclose(runner.feed(prompt), hf_logits(model, prompt), atol=ATOL, rtol=0)
    tokens = prompt + [int(hf_logits(model, prompt)[-1].argmax())]
    np.testing.assert_allclose(runner.feed(tokens[-1:])[-1], hf_logits(model, tokens)[-1],
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------- errors


@pytest.fixture
def good_file(tmp_path):
    hf = random_hf_weights(np.random.default_rng(0), **SHAPE)
    return hf, write_gguf(tmp_path / "good.gguf", "llama", META, gguf_tensors(hf, "llama", 4, 2))


def test_missing_tensor_is_named(good_file, tmp_path):
    hf, _ = good_file
    tensors = gguf_tensors(hf, "llama", 4, 2)
    del tensors["blk.0.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", "llama", META, tensors)
    with pytest.raises(ConfigError, match=r"tensor 'blk\.0\.ffn_up\.weight' not found in "
                                          r".*missing\.gguf"):
        load_gguf_params(path, load_gguf_config(path))


def test_unknown_architecture(good_file, tmp_path):
    hf, _ = good_file
    meta = {k.replace("llama.", "gpt2."): v for k, v in META.items()}
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", meta, gguf_tensors(hf, "llama", 4, 2))
    with pytest.raises(ConfigError, match=r"gpt2\.gguf: unsupported architecture 'gpt2' in "
                                          r"general\.architecture"):
        load_gguf_config(path)


def test_missing_field_is_named(good_file, tmp_path):
    hf, _ = good_file
    meta = {k: v for k, v in META.items() if k != "llama.feed_forward_length"}
    path = write_gguf(tmp_path / "nofield.gguf", "llama", meta, gguf_tensors(hf, "llama", 4, 2))
    with pytest.raises(ConfigError, match=r"nofield\.gguf: missing GGUF metadata field "
                                          r"'llama\.feed_forward_length'"):
        load_gguf_config(path)


@pytest.mark.parametrize("where", ["tensor data", "metadata"])
def test_truncated_file(good_file, tmp_path, where):
    _, path = good_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * 0.6) if where == "tensor data" else 100])
    with pytest.raises(ConfigError, match=r"cut\.gguf: cannot read GGUF file .*truncated"):
        load_model(str(cut))


def test_unsupported_tensor_type_is_named(good_file, tmp_path):
    hf, _ = good_file
    tensors = gguf_tensors(hf, "llama", 4, 2)
    # 256 rows of IQ4_NL blocks (32 values in 18 bytes): a valid layout fbjax refuses.
    tensors["blk.0.ffn_up.weight"] = (np.zeros((256, 256 // 32 * 18), np.uint8), Q.IQ4_NL)
    path = write_gguf(tmp_path / "iq.gguf", "llama", META, tensors)
    with pytest.raises(ConfigError, match=r"tensor 'blk\.0\.ffn_up\.weight' has type IQ4_NL"):
        load_gguf_params(path, load_gguf_config(path))


def test_unused_tensor_is_refused(good_file, tmp_path):
    hf, _ = good_file
    tensors = gguf_tensors(hf, "llama", 4, 2)
    tensors["blk.0.attn_output.bias"] = np.zeros(256, np.float32)
    path = write_gguf(tmp_path / "obias.gguf", "llama", META, tensors)
    with pytest.raises(ConfigError, match=r"blk\.0\.attn_output\.bias.*no place"):
        load_gguf_config(path)


def test_shape_mismatch_is_named(good_file, tmp_path):
    hf, _ = good_file
    path = write_gguf(tmp_path / "shape.gguf", "llama",
                      {**META, "llama.feed_forward_length": 512}, gguf_tensors(hf, "llama", 4, 2))
    with pytest.raises(ConfigError, match=r"'blk\.0\.ffn_gate\.weight' .*\(256, 256\) .*"
                                          r"expected \(512, 256\)"):
        load_gguf_params(path, load_gguf_config(path))


def test_not_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConfigError, match=r"junk\.gguf: cannot read GGUF file"):
        load_model(str(junk))
    with pytest.raises(ConfigError, match=r"model path not found: .*nope\.gguf"):
        load_model(str(tmp_path / "nope.gguf"))


# ---------------------------------------------------------------- tokenizers

CORPUS = ["Hello world, hello there! The quick brown fox jumps over the lazy dog.",
          "Numbers: 123 4567 89, and 2024-01-02. Code: def f(x): return x ** 2",
          "Ünïcödé wörds, naïve café; 日本語のテキスト and emoji 🚀 too.",
          "    indented line\n\ttabbed\r\nwindows line   trailing  "] * 20
TEXTS = ["Hello world, hello there!", "The quick brown fox 123456 jumps",
         "naïve café 日本語 🚀 ✓ €", "  leading and trailing spaces  ", "line\nbreaks\r\n\ttab",
         "<|im_start|>user\nHi there<|im_end|>\n", "def f(x):\n    return x ** 2", ""]


def _trained_bpe(metaspace: bool):
    """A small BPE trained here: byte-level (GPT-2 style) or over ``▁``-spaced text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        specials, alphabet = [], []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=alphabet,
        show_progress=False))
    return tok


def _bpe_merges(tok) -> list[str]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _model_tensors():
    hf = random_hf_weights(np.random.default_rng(0), **{**SHAPE, "vocab": 512})
    return gguf_tensors(hf, "llama", 4, 2)


@pytest.fixture(scope="module")
def byte_level_vocab():
    tok = _trained_bpe(metaspace=False)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return tok, {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": _bpe_merges(tok),
                 "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.ggml.padding_token_id": 0}


def _write_with_tokenizer(tmp_path, name, tok_meta):
    return write_gguf(tmp_path / name, "llama", {**META, **tok_meta}, _model_tensors())


def _transformers_ids(path, texts):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return [hf(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe"])
def test_byte_level_tokenizer_matches_transformers(byte_level_vocab, tmp_path, pre):
    trained, meta = byte_level_vocab
    path = _write_with_tokenizer(tmp_path, f"{pre}.gguf", {
        **meta, "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": False})
    tok = gguf_tokenizer(path)
    ours = [tok.encode(t) for t in TEXTS]
    assert ours == _transformers_ids(path, TEXTS)
    if pre == "gpt-2":  # the same split as the tokenizer it was trained with
        assert ours == [trained.encode(t).ids for t in TEXTS]
    for text, ids in zip(TEXTS, ours, strict=True):
        assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_byte_level_digits_and_specials(byte_level_vocab, tmp_path):
    """``smollm``: every digit on its own (llama.cpp isolates ``\\p{N}`` first); BOS
    added when ``add_bos_token``; specials whole, skipped on decode; ids from metadata."""
    _, meta = byte_level_vocab
    gpt2 = gguf_tokenizer(_write_with_tokenizer(tmp_path, "gpt2.gguf", meta))
    assert len(gpt2.encode("123456")) < 6  # the trained vocabulary merges digits
    path = _write_with_tokenizer(tmp_path, "smollm.gguf", {
        **meta, "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": True})
    tok = gguf_tokenizer(path)
    assert tok.encode("123456")[1:] == [tok.token_to_id(d) for d in "123456"]
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[:2] == [1, 1] and ids[-1] == 2  # BOS, then <|im_start|> (also id 1)
    assert tok.decode(ids) == "hi"
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(meta["tokenizer.ggml.tokens"])


@pytest.fixture(scope="module")
def sentencepiece_vocab():
    """A llama-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then BPE pieces scored
    by merge order (as SentencePiece scores them), and no merges: llama.cpp and
    transformers both derive them from the scores."""
    vocab = _trained_bpe(metaspace=True).get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_tokenizer_matches_transformers(sentencepiece_vocab, tmp_path):
    meta = {**sentencepiece_vocab, "tokenizer.ggml.pre": "default"}
    path = write_gguf(tmp_path / "spm.gguf", "llama", {**META, **meta}, {})
    tok = gguf_tokenizer(path)
    texts = [t for t in TEXTS if "<|" not in t]
    ours = [tok.encode(t) for t in texts]
    assert ours == _transformers_ids(path, texts)
    assert all(ids[0] == 1 for ids in ours)  # add_bos_token defaults to true for "llama"
    tokens = sentencepiece_vocab["tokenizer.ggml.tokens"]
    assert "<0xE2>" in [tokens[i] for i in tok.encode("€")]  # byte fallback
    for text, ids in zip(texts, ours, strict=True):
        # As in transformers, no "▁" is prepended to text that starts with a space, but
        # decoding strips one: leading spaces come back one short.
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text)


def test_sentencepiece_without_bos_or_space_prefix(sentencepiece_vocab, tmp_path):
    meta = {**sentencepiece_vocab, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.add_space_prefix": False}
    tok = gguf_tokenizer(write_gguf(tmp_path / "spm.gguf", "llama", {**META, **meta}, {}))
    ids = tok.encode("Hello")
    assert ids[-1] == 2 and 1 not in ids
    pieces = [sentencepiece_vocab["tokenizer.ggml.tokens"][i] for i in ids[:-1]]
    assert "".join(pieces) == "Hello"  # no "▁" prepended
    assert tok.decode(ids) == "Hello"


def test_bad_tokenizer_metadata(sentencepiece_vocab, tmp_path):
    meta = {**sentencepiece_vocab, "tokenizer.ggml.model": "bert"}
    with pytest.raises(ConfigError, match=r"tokenizer\.ggml\.model 'bert' is not supported"):
        gguf_tokenizer(write_gguf(tmp_path / "a.gguf", "llama", {**META, **meta}, {}))
    meta = {**sentencepiece_vocab, "tokenizer.ggml.eos_token_id": 100000}
    with pytest.raises(ConfigError, match=r"eos_token_id 100000 is not a token id"):
        gguf_tokenizer(write_gguf(tmp_path / "b.gguf", "llama", {**META, **meta}, {}))


# ---------------------------------------------------------------- chat template, load_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_from_metadata(byte_level_vocab, tmp_path, caplog):
    _, meta = byte_level_vocab
    path = _write_with_tokenizer(tmp_path, "chat.gguf",
                                 {**meta, "tokenizer.chat_template": CHATML + "{{ eos_token }}"})
    assert gguf_chat_template(path)[1:] == ("<|im_start|>", "<|im_end|>")
    template = ChatTemplate.for_model(str(path))
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>")
    bare = _write_with_tokenizer(tmp_path, "bare.gguf", meta)
    with caplog.at_level(logging.WARNING):
        assert ChatTemplate.for_model(str(bare)).template is not None
    assert "no chat template in its GGUF metadata (tokenizer.chat_template)" in caplog.text


def test_load_model_gguf(byte_level_vocab, tmp_path):
    _, meta = byte_level_vocab
    path = _write_with_tokenizer(tmp_path, "model.gguf", {
        **meta, "tokenizer.ggml.eot_token_id": 0})
    renamed = tmp_path / "model.bin"  # found by its magic, not its name
    renamed.write_bytes(path.read_bytes())
    assert is_gguf_file(path) and is_gguf_file(renamed) and not is_gguf_file(tmp_path)
    loaded = load_model(str(renamed))
    config = loaded.config
    assert (config.vocab_size, config.num_layers, config.head_dim) == (512, 1, 64)
    assert config.eos_token_ids == (2, 0) == loaded.tokenizer.eos_token_ids
    assert config.bos_token_id == 1 and not config.tie_word_embeddings
    assert config.name == "model.bin"
    assert loaded.tokenizer.encode("Hello world") == gguf_tokenizer(path).encode("Hello world")
    assert set(loaded.params) == {"embed_tokens", "layers_0", "norm", "lm_head"}


def test_router_counts_gguf_prompts(byte_level_vocab, tmp_path):
    from fbjax.router.prompt import prompt_token_counter

    _, meta = byte_level_vocab
    path = _write_with_tokenizer(tmp_path, "r.gguf", {**meta, "tokenizer.chat_template": CHATML})
    count = prompt_token_counter(str(path))
    tok = gguf_tokenizer(path)
    assert count("/v1/completions", {"prompt": "Hello world"}) == len(tok.encode("Hello world"))
    assert count("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}) == (
        len(tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")))
