"""Exported steps: a second start loads each bucket's program instead of tracing it."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest
from fbjax_kernels.ragged_paged_attention import cpu_ffi

from fbjax.config import BucketConfig
from fbjax.engine.engine import LLMEngine
from fbjax.engine.step_export import StepExporter
from fbjax.sched.request import SamplingParams
from tests.conftest import engine_config
from tests.kernels.oracle import make_ragged_batch

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[256, 72, 105], [256, *range(40, 70)], [256, 33]]
BUCKETS = BucketConfig(token_buckets=(16, 32), seq_buckets=(4,))


def count_exports(monkeypatch) -> list:
    exports = []
    real = StepExporter._export

    def spy(self, args):
        exports.append(args)
        return real(self, args)

    monkeypatch.setattr(StepExporter, "_export", spy)
    return exports


def generate(engine: LLMEngine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


def test_a_second_start_loads_every_bucket_and_answers_the_same(builtin_model, tmp_path,
                                                                monkeypatch, caplog):
    config = engine_config(compilation_cache_dir=str(tmp_path / "jax"), buckets=BUCKETS)
    exports = count_exports(monkeypatch)
    first = LLMEngine(config, loaded=builtin_model)
    stored = sorted((tmp_path / "jax" / "fbjax-steps").glob("step-*.exported"))
    assert len(exports) == len(stored) == len(BUCKETS.pairs())
    want = generate(first)
    # The same answers as a start that traces (no cache, so nothing exported).
    traced = LLMEngine(engine_config(compilation_cache_dir=None, buckets=BUCKETS),
                       loaded=builtin_model)
    assert generate(traced) == want

    exports.clear()
    assert generate(LLMEngine(config, loaded=builtin_model)) == want
    assert exports == []  # every bucket came from its stored program

    stored[0].write_bytes(b"not a flatbuffer")  # a damaged entry is rebuilt
    with caplog.at_level(logging.WARNING, logger="fbjax.engine.step_export"):
        assert generate(LLMEngine(config, loaded=builtin_model)) == want
    assert len(exports) == 1
    assert "does not load" in caplog.text
    assert stored[0].read_bytes() != b"not a flatbuffer"


def test_the_key_covers_shapes_dtypes_and_tree(tmp_path):
    exporter = StepExporter(tmp_path, lambda x: x * 2, "double")
    keys = {exporter.key(args) for args in [
        (np.zeros(3, np.float32),), (np.zeros(4, np.float32),), (np.zeros(3, np.int32),),
        ((np.zeros(3, np.float32),),), ({"x": np.zeros(3, np.float32)},)]}
    assert len(keys) == 5
    assert exporter.key((np.ones(3, np.float32),)) == exporter.key((np.zeros(3, np.float32),))
    assert StepExporter(tmp_path, abs, "other").key((np.zeros(3),)) != exporter.key(
        (np.zeros(3),))


def test_a_stored_step_computes_what_the_function_does(tmp_path):
    exporter = StepExporter(tmp_path, lambda x, pair: (x * 2 + pair[0], pair[1]), "f")
    args = (jnp.arange(4.0), (jnp.ones(4), jnp.int32(7)))
    for _ in range(2):  # exported, then loaded
        out = exporter.load_or_export(args)(*args)
        np.testing.assert_array_equal(out[0], [1.0, 3.0, 5.0, 7.0])
        assert int(out[1]) == 7
    with pytest.raises(TypeError, match="do not match"):
        exporter.load_or_export(args)(jnp.arange(4.0), jnp.ones(4))


def test_an_unnamed_custom_call_is_traced_instead(tmp_path, caplog):
    """jax.export refuses custom calls it is not told about; the store then answers None
    (the caller traces) and says why, rather than storing something it cannot check."""
    isa = cpu_ffi.default_isa()
    batch = make_ragged_batch(np.random.default_rng(0), 1, [3], [5], 16, 2, 1, 2, 32,
                              np.float32)

    def attention(*args):
        return cpu_ffi.ragged_paged_attention(*args, isa=isa)

    cpu_ffi.load()
    with caplog.at_level(logging.WARNING, logger="fbjax.engine.step_export"):
        assert StepExporter(tmp_path, attention, "a").load_or_export(batch.args) is None
    assert "cannot export" in caplog.text
    named = StepExporter(tmp_path, attention, "a", custom_calls=[cpu_ffi.target_name(isa)])
    np.testing.assert_array_equal(named.load_or_export(batch.args)(*batch.args),
                                  attention(*batch.args))
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_store_still_runs(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the directory should be
    exporter = StepExporter(blocker / "steps", lambda x: x + 1, "f")
    with caplog.at_level(logging.WARNING, logger="fbjax.engine.step_export"):
        call = exporter.load_or_export((jnp.zeros(2),))
    np.testing.assert_array_equal(call(jnp.zeros(2)), [1.0, 1.0])
    assert "cannot store" in caplog.text


def test_engines_that_differ_only_in_what_no_shape_shows_do_not_share_programs(
        builtin_model, tmp_path, monkeypatch):
    """Same shapes, another attention implementation or rope base: each its own entry
    (sharing one would run the other's program)."""
    import dataclasses

    from fbjax.model.weights import LoadedModel

    config = engine_config(compilation_cache_dir=str(tmp_path / "jax"), buckets=BUCKETS)
    exports = count_exports(monkeypatch)
    LLMEngine(config, loaded=builtin_model)
    LLMEngine(dataclasses.replace(config, attention_impl="xla"), loaded=builtin_model)
    other_rope = LoadedModel(dataclasses.replace(builtin_model.config, rope_theta=1234.0),
                             builtin_model.params, builtin_model.tokenizer)
    LLMEngine(config, loaded=other_rope)
    stored = list((tmp_path / "jax" / "fbjax-steps").glob("step-*.exported"))
    assert len(exports) == len(stored) == 3 * len(BUCKETS.pairs())
