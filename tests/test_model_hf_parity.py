"""The Flax model, loaded through fbjax's HF loader, against Hugging Face in torch.

Tiny random Llama / Qwen2 / Mistral models are built with ``transformers`` (nothing is
downloaded), saved as safetensors, loaded with :mod:`fbjax.model.weights` and run over
a paged KV cache whose page table is shuffled, so paging bugs show up as logit
mismatches. Checked: prefill logits of every prompt token (at once and in two chunks),
step-by-step decode logits, and 32 greedy tokens against ``generate``. Also: orbax
round trip, sharded and bfloat16 checkpoints, and the loader's error messages.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from fbjax_kernels.ragged_paged_attention import get_attention  # noqa: E402

from fbjax.config import ConfigError, ModelConfig  # noqa: E402
from fbjax.model.llama import AttentionMetadata, LlamaForCausalLM  # noqa: E402
from fbjax.model.tokenizer import ByteTokenizer  # noqa: E402
from fbjax.model.weights import (  # noqa: E402
    init_random_params,
    load_hf_config,
    load_hf_params,
    load_model,
    restore_params,
    save_params,
)

PAGE_SIZE = 4
NUM_PAGES = 24
PAGES_PER_SEQ = 16  # 64 tokens: prompt (20) + up to 32 generated
PROMPT_LEN = 20
DECODE_STEPS = 8
GEN_TOKENS = 32
ATOL = 1e-4

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.1, attn_implementation="eager")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama3rope-tied": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral-window8": ("mistral", dict(tie_word_embeddings=False, sliding_window=8)),
}


def _hf_classes(family):
    t = transformers
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
    }[family]


def build_hf_model(family: str, overrides: dict, seed: int = 0):
    """A tiny random HF model in float32, with norms and biases perturbed from their
    (1, 0) init so that a missing or misplaced norm/bias tensor changes the logits."""
    config_cls, model_cls = _hf_classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, path, **kwargs):
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


# ---------------------------------------------------------------- running our model


_STEPS: dict[str, object] = {}


class PagedRunner:
    """One sequence through our model over a paged cache with a shuffled page table."""

    def __init__(self, config: ModelConfig, params, seed: int = 0,
                 attention_impl: str = "reference", max_tokens: int = PAGES_PER_SEQ * PAGE_SIZE):
        self.config = config
        self.params = params
        self.model = LlamaForCausalLM(config, get_attention(attention_impl))
        rng = np.random.default_rng(seed)
        pages_per_seq = -(-max_tokens // PAGE_SIZE)
        num_pages = NUM_PAGES * pages_per_seq // PAGES_PER_SEQ  # as many spare pages
        self.page_table = rng.permutation(num_pages)[:pages_per_seq].astype(np.int32)
        assert not np.all(np.diff(self.page_table) == 1)
        shape = (num_pages, PAGE_SIZE, config.num_kv_heads, config.head_dim)
        self.cache = tuple((jnp.zeros(shape), jnp.zeros(shape))
                           for _ in range(config.num_layers))
        self.length = 0
        key = (repr(config), attention_impl)  # one jitted step per model and attention
        if key not in _STEPS:
            model = self.model

            def step(params, tokens, cache, meta):
                hidden, cache = model.apply({"params": params}, tokens, cache, meta)
                logits = model.apply({"params": params}, hidden,
                                     method=LlamaForCausalLM.logits)
                return logits, cache

            _STEPS[key] = jax.jit(step)
        self._step = _STEPS[key]

    def feed(self, tokens) -> np.ndarray:
        """Run ``tokens`` as the next chunk of the sequence; logits [len(tokens), vocab]."""
        tokens = np.asarray(tokens, np.int32)
        n = len(tokens)
        positions = np.arange(self.length, self.length + n, dtype=np.int32)
        slots = self.page_table[positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE
        meta = AttentionMetadata(
            positions=jnp.asarray(positions),
            slot_mapping=jnp.asarray(slots, jnp.int32),
            kv_lens=jnp.array([self.length + n], jnp.int32),
            page_indices=jnp.asarray(self.page_table[None, :]),
            cu_q_lens=jnp.array([0, n], jnp.int32),
            num_seqs=jnp.array(1, jnp.int32),
        )
        logits, self.cache = self._step(self.params, jnp.asarray(tokens), self.cache, meta)
        self.length += n
        return np.asarray(logits)


def hf_logits(hf_model, tokens) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(torch.tensor([list(tokens)], dtype=torch.long))
    return out.logits[0].float().numpy()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    hf_model = build_hf_model(family, overrides)
    path = save_hf(hf_model, tmp_path_factory.mktemp(request.param))
    config = load_hf_config(path)
    params = load_hf_params(path, config)
    prompt = np.random.default_rng(1).integers(0, SMALL["vocab_size"], PROMPT_LEN).tolist()
    return dict(name=request.param, hf=hf_model, path=path, config=config, params=params,
                prompt=prompt)


# ---------------------------------------------------------------- parity

# The jnp reference and the CPU path's C++ kernel (the one ``auto`` picks on CPU).
ATTENTION_IMPLS = ["reference", "cpu_ffi"]


def test_config_mapping(variant):
    config, hf_cfg = variant["config"], variant["hf"].config
    assert config.num_layers == hf_cfg.num_hidden_layers
    assert config.num_kv_heads == hf_cfg.num_key_value_heads
    assert config.head_dim == hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert config.rms_norm_eps == hf_cfg.rms_norm_eps
    assert config.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert config.attention_bias == (variant["name"] == "qwen2")
    assert config.sliding_window == (8 if variant["name"] == "mistral-window8" else None)
    if "llama3rope" in variant["name"]:
        assert config.rope_scaling["rope_type"] == "llama3"
        assert config.rope_scaling["factor"] == 8.0
    else:
        assert config.rope_scaling is None
    assert config.name == variant["path"].name
    assert ("lm_head" in variant["params"]) == (not config.tie_word_embeddings)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_prefill_logits_match_hf(variant, impl):
    prompt = variant["prompt"]
    want = hf_logits(variant["hf"], prompt)
    got = PagedRunner(variant["config"], variant["params"], attention_impl=impl).feed(prompt)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # The same prompt in two chunks (the second sees the first through the cache); the
    # chunk boundary (10) is not a page boundary (4), so a page is shared by both chunks.
    runner = PagedRunner(variant["config"], variant["params"], seed=5, attention_impl=impl)
    half = PROMPT_LEN // 2
    chunked = np.concatenate([runner.feed(prompt[:half]), runner.feed(prompt[half:])])
    np.testing.assert_allclose(chunked, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_decode_logits_match_hf(variant, impl):
    runner = PagedRunner(variant["config"], variant["params"], attention_impl=impl)
    tokens = list(variant["prompt"])
    runner.feed(tokens)
    for _ in range(DECODE_STEPS):
        tokens.append(int(hf_logits(variant["hf"], tokens)[-1].argmax()))
        got = runner.feed(tokens[-1:])[-1]
        want = hf_logits(variant["hf"], tokens)[-1]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0,
                                   err_msg=f"decode step at position {len(tokens) - 1}")


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_greedy_generation_matches_hf_generate(variant, impl):
    prompt = variant["prompt"]
    hf_model = variant["hf"]
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                dtype=torch.long), do_sample=False, max_new_tokens=GEN_TOKENS,
                                min_new_tokens=GEN_TOKENS)
    want = out[0, len(prompt):].tolist()
    runner = PagedRunner(variant["config"], variant["params"], attention_impl=impl)
    got = [int(runner.feed(prompt)[-1].argmax())]
    while len(got) < GEN_TOKENS:
        got.append(int(runner.feed(got[-1:])[-1].argmax()))
    assert got == want


# ---------------------------------------------------------------- checkpoints


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    hf_model = build_hf_model("qwen2", dict(tie_word_embeddings=False))
    return hf_model, save_hf(hf_model, tmp_path_factory.mktemp("qwen-ckpt"))


def test_orbax_round_trip(qwen_dir, tmp_path):
    _, path = qwen_dir
    params = load_hf_params(path, load_hf_config(path))
    saved = save_params(params, tmp_path / "ckpt")
    assert saved.is_absolute() and saved.exists()
    _assert_trees_equal(restore_params(tmp_path / "ckpt"), params)
    _assert_trees_equal(restore_params(tmp_path / "ckpt", target=params), params)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        restore_params(tmp_path / "nope")


def test_sharded_checkpoint_loads_same_params(qwen_dir, tmp_path):
    hf_model, path = qwen_dir
    sharded = save_hf(hf_model, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    config = load_hf_config(path)
    _assert_trees_equal(load_hf_params(sharded, config), load_hf_params(path, config))


def test_bfloat16_checkpoint(qwen_dir, tmp_path):
    hf_model, path = qwen_dir
    bf16 = build_hf_model("qwen2", dict(tie_word_embeddings=False)).to(torch.bfloat16)
    save_hf(bf16, tmp_path / "bf16")
    config = load_hf_config(tmp_path / "bf16")
    params = load_hf_params(tmp_path / "bf16", config, dtype=jnp.float32)
    ref = load_hf_params(path, config, dtype=jnp.bfloat16)
    _assert_trees_equal(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), ref)
    assert params["norm"]["weight"].dtype == jnp.float32


def test_missing_tensor_is_named(qwen_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = qwen_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*"
                                          r"model\.safetensors"):
        load_hf_params(broken, load_hf_config(broken))


def test_shape_mismatch_is_named(qwen_dir, tmp_path):
    _, path = qwen_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*"
                                          r"\(128, 64\), expected \(96, 64\)"):
        load_hf_params(broken, load_hf_config(broken))


def test_no_safetensors(qwen_dir, tmp_path):
    _, path = qwen_dir
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        load_hf_params(tmp_path, load_hf_config(tmp_path))


# ---------------------------------------------------------------- config errors


def _write_config(tmp_path, cfg, text=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(text if text is not None else json.dumps(cfg))
    return tmp_path


BASE_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256}


def test_unknown_path(tmp_path):
    with pytest.raises(ConfigError, match="model path not found: .*does-not-exist"):
        load_hf_config(tmp_path / "does-not-exist")
    with pytest.raises(ConfigError, match="model path not found"):
        load_model(str(tmp_path / "does-not-exist"))


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_hf_config(tmp_path)


def test_malformed_json(tmp_path):
    _write_config(tmp_path, None, text='{\n  "vocab_size": 128,\n  "hidden_size": ,\n}')
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON at line 3 column"):
        load_hf_config(tmp_path)


def test_unsupported_architecture(tmp_path):
    _write_config(tmp_path, {**BASE_CFG, "architectures": ["GPT2LMHeadModel"],
                             "model_type": "gpt2"})
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture "
                                          r"\['GPT2LMHeadModel'\]"):
        load_hf_config(tmp_path)


def test_missing_required_field(tmp_path):
    _write_config(tmp_path, {k: v for k, v in BASE_CFG.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match=r"config\.json: missing required field.*hidden_size"):
        load_hf_config(tmp_path)


def test_bad_field_value_names_file(tmp_path):
    _write_config(tmp_path, {**BASE_CFG, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match=r"config\.json: .*num_kv_heads \(3\)"):
        load_hf_config(tmp_path)


def test_unsupported_rope_type(tmp_path):
    _write_config(tmp_path, {**BASE_CFG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match=r"config\.json: rope_scaling type 'yarn'"):
        load_hf_config(tmp_path)


def test_old_style_rope_and_eos_from_generation_config(tmp_path):
    _write_config(tmp_path, {**BASE_CFG, "rope_theta": 500000.0, "eos_token_id": 2,
                             "bos_token_id": 1,
                             "rope_scaling": {"type": "linear", "factor": 2.0}})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    config = load_hf_config(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"type": "linear", "factor": 2.0}
    assert config.eos_token_ids == (2, 7)
    assert config.bos_token_id == 1
    assert config.num_kv_heads == 4 and config.head_dim == 16


def test_qwen2_sliding_window_only_when_enabled(tmp_path):
    cfg = {**BASE_CFG, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
           "sliding_window": 32, "use_sliding_window": False}
    assert load_hf_config(_write_config(tmp_path / "a", cfg)).sliding_window is None
    cfg.update(use_sliding_window=True, max_window_layers=0)
    assert load_hf_config(_write_config(tmp_path / "b", cfg)).sliding_window == 32
    cfg.update(max_window_layers=1)
    with pytest.raises(ConfigError, match="sliding window on only some layers"):
        load_hf_config(_write_config(tmp_path / "c", cfg))


# ---------------------------------------------------------------- load_model / random init


def test_load_model_builtin():
    loaded = load_model(None)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.config.bos_token_id == loaded.tokenizer.bos_token_id
    assert loaded.config.eos_token_ids == loaded.tokenizer.eos_token_ids
    assert loaded.params["embed_tokens"]["embedding"].shape == (
        loaded.config.vocab_size, loaded.config.hidden_size)
    _assert_trees_equal(loaded.params, init_random_params(loaded.config))


def test_init_random_params_is_seeded():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16,
                         max_position_embeddings=64, attention_bias=True)
    a = init_random_params(config, seed=3)
    _assert_trees_equal(a, init_random_params(config, seed=3))
    b = init_random_params(config, seed=4)
    assert not np.array_equal(a["embed_tokens"]["embedding"], b["embed_tokens"]["embedding"])
    assert a["layers_0"]["self_attn"]["q_proj"]["bias"].shape == (32,)
    assert init_random_params(config, jnp.bfloat16)["norm"]["weight"].dtype == jnp.bfloat16


def test_load_model_hf_dir_needs_tokenizer_json(qwen_dir, tmp_path):
    _, path = qwen_dir
    with pytest.raises(ConfigError, match=r"tokenizer file not found: .*tokenizer\.json"):
        load_model(str(path))


def test_load_model_hf_dir(qwen_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, path = qwen_dir
    model_dir = tmp_path / "with-tok"
    shutil.copytree(path, model_dir)
    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100, "</s>": 101}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    loaded = load_model(str(model_dir))
    assert loaded.config.name == "with-tok"
    assert loaded.tokenizer.encode("w3 w99") == [3, 99]
    assert loaded.config.eos_token_ids == (101,) == loaded.tokenizer.eos_token_ids
    assert "lm_head" in loaded.params


# ---------------------------------------------------------------- log-probabilities


def test_engine_logprobs_match_hf(qwen_dir):
    """The engine's per-token log-probabilities (sampled token and top-5), from its
    compiled ragged steps with chunked prefill beside other requests, against
    transformers' log-softmax over the same sequence; greedy, so the top-1 is the token."""
    from fbjax.engine.engine import LLMEngine
    from fbjax.model.weights import LoadedModel
    from fbjax.sched.request import SamplingParams
    from tests.conftest import engine_config

    hf_model, path = qwen_dir
    config = load_hf_config(path)
    loaded = LoadedModel(config, load_hf_params(path, config), ByteTokenizer())
    engine = LLMEngine(engine_config(max_model_len=128), loaded=loaded)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, SMALL["vocab_size"], n).tolist() for n in (40, 7, 90)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0,
                             prompt_logprobs=3)]
    outs = engine.generate(prompts, params)
    assert outs[1].logprobs is None and outs[0].prompt_logprobs is None
    # The 90-token prompt, prefilled in chunks of at most 64 tokens: every prompt token
    # after the first, scored by the position before it.
    prompt, scored = prompts[2], outs[2].prompt_logprobs
    want = torch.log_softmax(torch.tensor(hf_logits(hf_model, prompt)), -1).numpy()
    assert [t.token_id for t in scored] == prompt[1:]
    for j, lp in enumerate(scored):
        assert lp.logprob == pytest.approx(float(want[j, prompt[j + 1]]), abs=1e-3)
        assert [t for t, _ in lp.top] == np.argsort(-want[j])[:3].tolist()
    for prompt, sp, out in ((prompts[0], params[0], outs[0]), (prompts[2], params[2], outs[2])):
        assert len(out.logprobs) == len(out.token_ids) == sp.max_tokens
        sequence = prompt + out.token_ids
        want = torch.log_softmax(torch.tensor(hf_logits(hf_model, sequence)), -1).numpy()
        for j, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = want[len(prompt) + j - 1]
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(float(row[token]), abs=1e-3)
            assert len(lp.top) == sp.logprobs
            if lp.top:
                assert lp.top[0][0] == token  # greedy
                assert [t for t, _ in lp.top] == np.argsort(-row)[:sp.logprobs].tolist()
                np.testing.assert_allclose([v for _, v in lp.top],
                                           np.sort(row)[::-1][:sp.logprobs], atol=1e-3)
