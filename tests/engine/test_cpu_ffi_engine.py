"""The engine on the C++ FFI attention kernel (``cpu_ffi``, what ``auto`` picks on CPU).

The engine tests that use the shared ``engine`` fixture (batch invariance, zero
recompiles, ...) already run on it; here: that they do, that it generates what the
jnp reference generates, and that bucket executables calling the FFI target survive
the persistent compilation cache in fresh processes (the target is registered before
a cached executable is loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from fbjax_kernels.ragged_paged_attention import cpu_ffi

from fbjax.config import BucketConfig, CacheConfig
from fbjax.engine.engine import LLMEngine
from fbjax.sched.request import SamplingParams
from tests.conftest import engine_config

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(buckets=BucketConfig((16, 32), (4,)), cache=CacheConfig(16, 64),
             max_model_len=128)
PROMPTS = [[256, 72, 101, 108, 108, 111], [256] + list(range(40, 70)),
           [256] + list(range(33, 120, 2))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_engine_fixture_runs_cpu_ffi(engine):
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks cpu_ffi only on CPU")
    assert engine.runner.model.attention_fn is cpu_ffi.ragged_paged_attention
    hlo = engine.runner.executables.get((16, 4)).as_text()
    assert cpu_ffi.target_name(cpu_ffi.default_isa()) in hlo


def test_cpu_ffi_generates_what_the_reference_generates(builtin_model):
    reference = LLMEngine(engine_config(attention_impl="reference", **SMALL),
                          loaded=builtin_model)
    ffi = LLMEngine(engine_config(attention_impl="cpu_ffi", **SMALL), loaded=builtin_model)
    expected = [o.token_ids for o in reference.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in ffi.generate(PROMPTS, GREEDY)] == expected


_CHILD = """
import json, sys
import jax
from fbjax.config import BucketConfig, CacheConfig
from fbjax.engine.engine import LLMEngine
from fbjax.sched.request import SamplingParams
from tests.conftest import engine_config

hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
config = engine_config(attention_impl="cpu_ffi", compilation_cache_dir=sys.argv[1],
                       buckets=BucketConfig((16, 32), (4,)), cache=CacheConfig(16, 64),
                       max_model_len=128)
engine = LLMEngine(config)
out = engine.generate(json.loads(sys.argv[2]),
                      SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
print(json.dumps({"tokens": [o.token_ids for o in out], "cache_hits": len(hits)}))
"""


def test_persistent_compilation_cache_in_fresh_processes(tmp_path):
    """The second process loads every bucket from the cache and generates the same."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path / "jax-cache"), json.dumps(PROMPTS)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    # (small helper computations hit the cache within the first process already)
    assert second["cache_hits"] >= first["cache_hits"] + 2  # both buckets from the cache
    assert second["tokens"] == first["tokens"]
