"""Output tokens/s of the engine vs Hugging Face ``generate``, same weights, same batch.

Builds a random Llama-shaped checkpoint with the built-in model's shape in transformers,
saves it with ``save_pretrained``, loads it into fbjax, then for 1, 8 and 32 concurrent
requests measures the wall time to finish the batch in both, side by side in one run:

* ``fixed``: every request generates ``--output_len`` tokens (EOS ignored). The same
  arithmetic in both; this isolates the per-step efficiency of the engine.
* ``varied``: each request has its own length, uniform in ``--varied_output``, as in
  serving traffic. HF ``generate`` runs one static batch, so it must decode every row
  until the longest is done; the engine retires each request at its own length
  (continuous batching). Only each request's own tokens count as output in both.

Prompts are random, of uniform random length in [--min_prompt, --max_prompt]; greedy.
fbjax start-up compilation and one small warm-up call of each are not timed; the best
of ``--repeats`` runs is reported.

With ``--attention_impls xla,cpu_ffi`` one engine per attention implementation is
built and they are timed interleaved with HF in the same run (rows per implementation).

    python scripts/bench_engine.py [--concurrency 1,8,32] [--output_len 128]
"""

from __future__ import annotations

import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_list("concurrency", ["1", "8", "32"], "Concurrent requests per batch.")
flags.DEFINE_integer("output_len", 128, "Tokens per request in the fixed-length workload.")
flags.DEFINE_list("varied_output", ["16", "256"], "lo,hi of per-request output lengths in "
                  "the varied workload.")
flags.DEFINE_integer("min_prompt", 32, "Shortest prompt (tokens).")
flags.DEFINE_integer("max_prompt", 256, "Longest prompt (tokens).")
flags.DEFINE_integer("repeats", 2, "Timed runs per setting; the best is reported.")
flags.DEFINE_integer("seed", 0, "Seed for prompts and weights.")
flags.DEFINE_list("attention_impls", ["auto"], "Attention implementations to compare "
                  "(one engine each, timed interleaved).")

PAD = 258


def build_hf_checkpoint(out_dir: Path, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fbjax.config import ModelConfig
    from fbjax.resources import BUILTIN_MODEL_CONFIG

    mc = ModelConfig.from_json(BUILTIN_MODEL_CONFIG)
    hf_cfg = LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size, num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim, max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps, rope_theta=mc.rope_theta,
        tie_word_embeddings=mc.tie_word_embeddings, bos_token_id=mc.bos_token_id,
        eos_token_id=list(mc.eos_token_ids), pad_token_id=PAD)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def time_fbjax(engine, prompts, output_lens: list[int]) -> float:
    from fbjax.sched.request import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in output_lens]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outputs] == output_lens
    return elapsed


def time_hf(model, prompts, output_lens: list[int]) -> float:
    """One static batch, decoded until the longest request is done."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation wants
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    longest = max(output_lens)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                             min_new_tokens=longest, do_sample=False, pad_token_id=PAD)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + longest
    return elapsed


def main(argv):
    del argv
    import jax.numpy as jnp

    from fbjax.config import EngineConfig
    from fbjax.engine.engine import LLMEngine
    from fbjax.model.tokenizer import ByteTokenizer
    from fbjax.model.weights import LoadedModel, load_hf_config, load_hf_params

    rng = random.Random(FLAGS.seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf_checkpoint(Path(tmp), FLAGS.seed)
        config = load_hf_config(tmp)
        loaded = LoadedModel(config, load_hf_params(tmp, config, jnp.float32), ByteTokenizer())
    engines = {}
    for impl in FLAGS.attention_impls:
        start = time.perf_counter()
        engines[impl] = LLMEngine(dataclasses.replace(EngineConfig(), show_progress=False,
                                                      attention_impl=impl), loaded=loaded)
        print(f"fbjax[{impl}] start-up: {time.perf_counter() - start:.1f} s, "
              f"{len(engines[impl].runner.executables)} executables")
    lo, hi = (int(x) for x in FLAGS.varied_output)

    rows = []
    for n in (int(c) for c in FLAGS.concurrency):
        prompts = [[256] + [rng.randrange(32, 127) for _ in range(
            rng.randint(FLAGS.min_prompt, FLAGS.max_prompt) - 1)] for _ in range(n)]
        for engine in engines.values():
            time_fbjax(engine, prompts[:1], [4])  # warm caches; nothing compiles here
        time_hf(hf_model, prompts[:1], [4])
        workloads = {"fixed": [FLAGS.output_len] * n,
                     "varied": [rng.randint(lo, hi) for _ in range(n)]}
        for name, lens in workloads.items():
            fb = {impl: float("inf") for impl in engines}
            hf = float("inf")
            for _ in range(FLAGS.repeats):  # interleaved: noise hits every variant alike
                for impl, engine in engines.items():
                    fb[impl] = min(fb[impl], time_fbjax(engine, prompts, lens))
                hf = min(hf, time_hf(hf_model, prompts, lens))
            tokens = sum(lens)
            for impl, seconds in fb.items():
                rows.append((n, name, impl, tokens / seconds, tokens / hf))
                print(f"  {n:3d} requests, {name:6s} outputs: fbjax[{impl}] "
                      f"{tokens / seconds:8.1f} tok/s   HF {tokens / hf:8.1f} tok/s   "
                      f"ratio {hf / seconds:5.2f}x", flush=True)

    print("\n| concurrent requests | output lengths | attention | fbjax out tok/s "
          "| HF generate out tok/s | fbjax / HF |")
    print("|---:|---|---|---:|---:|---:|")
    for n, name, impl, fb, hf in rows:
        desc = (f"fixed {FLAGS.output_len}" if name == "fixed"
                else f"uniform {lo}-{hi}")
        print(f"| {n} | {desc} | {impl} | {fb:.1f} | {hf:.1f} | {fb / hf:.2f}x |")


if __name__ == "__main__":
    app.run(main)
