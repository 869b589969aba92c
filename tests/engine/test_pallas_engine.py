"""The engine generating through a Pallas attention kernel (interpret mode on CPU)."""

from __future__ import annotations

import pytest
from fbjax_kernels.ragged_paged_attention import IMPLEMENTATIONS

from fbjax.config import BucketConfig, CacheConfig
from fbjax.engine.engine import LLMEngine
from fbjax.sched.request import SamplingParams
from tests.conftest import engine_config

PALLAS = sorted(name for name in IMPLEMENTATIONS if name.startswith("pallas"))


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_path_matches_reference_greedy(builtin_model, impl):
    small = dict(buckets=BucketConfig((16, 32), (4,)), cache=CacheConfig(16, 64),
                 max_model_len=128)
    prompts = [[256, 72, 101, 108, 108, 111], [256] + list(range(40, 70))]
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = LLMEngine(engine_config(attention_impl="reference", **small),
                          loaded=builtin_model)
    pallas = LLMEngine(engine_config(attention_impl=impl, **small), loaded=builtin_model)
    expected = [o.token_ids for o in reference.generate(prompts, sampling)]
    assert [o.token_ids for o in pallas.generate(prompts, sampling)] == expected


def test_unknown_attention_impl_is_clear(builtin_model):
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        LLMEngine(engine_config(attention_impl="flash"), loaded=builtin_model)
