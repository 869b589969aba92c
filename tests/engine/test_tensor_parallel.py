"""Tensor parallelism on 4 simulated CPU devices (a subprocess: the device count is fixed
when JAX starts): greedy outputs (with and without penalties) equal one device's, the
weights and KV pages stay split over the ``tp`` axis across steps, and a split the model
cannot take is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json
from fbjax.config import BucketConfig, CacheConfig, ConfigError, EngineConfig
from fbjax.engine.engine import LLMEngine
from fbjax.model.weights import load_model
from fbjax.sched.request import SamplingParams

loaded = load_model(None)
common = dict(buckets=BucketConfig((16, 64), (4,)), cache=CacheConfig(16, 128),
              max_model_len=256, show_progress=False, compilation_cache_dir=None)


def spec(array):
    # The spec padded to the array's rank (jit drops trailing Nones), None if unsharded.
    sharding_spec = getattr(array.sharding, "spec", None)
    if sharding_spec is None:
        return None
    return [*sharding_spec] + [None] * (array.ndim - len(sharding_spec))


prompts = ["hello there", "a longer prompt that is chunked " * 3, "x", "tensor parallel"]
greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
penalized = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                           repetition_penalty=1.3, frequency_penalty=0.5)
out = {}
for tp in (1, 2):
    engine = LLMEngine(EngineConfig(tensor_parallel=tp, **common), loaded=loaded)
    out[f"tokens_{tp}"] = [o.token_ids for o in engine.generate(
        prompts, [greedy, penalized, greedy, penalized])]
    runner = engine.runner
    out[f"kv_spec_{tp}"] = spec(runner.kv_cache[0][0])
    layer = runner.params["layers_0"]
    out[f"q_spec_{tp}"] = spec(layer["self_attn"]["q_proj"]["kernel"])
    out[f"down_spec_{tp}"] = spec(layer["mlp"]["down_proj"]["kernel"])
try:
    LLMEngine(EngineConfig(tensor_parallel=4, **common), loaded=loaded)
    out["tp4_error"] = None
except ConfigError as e:
    out["tp4_error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_tensor_parallel_matches_one_device_and_stays_sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["tokens_2"] == out["tokens_1"]
    assert all(len(t) == 24 for t in out["tokens_1"])
    assert out["kv_spec_2"] == [None, None, "tp", None]  # pages split over KV heads
    assert out["q_spec_2"] == [None, "tp"]  # column parallel
    assert out["down_spec_2"] == ["tp", None]  # row parallel
    # The built-in model has 2 KV heads: 4 ways cannot split them.
    assert "tensor_parallel=4 must divide the model's num_kv_heads (2)" in out["tp4_error"]
