"""The baselines the protocol compares against are the ones users would run: Sarathi
over a fine ladder of budgets that are real buckets, vLLM with its own defaults for the
device, Sarathi with deadline-ordered admission."""

from __future__ import annotations

import pytest

from fbjax.profiling.store import load_profile
from fbjax.sim.instance import build_scheduler
from fbjax.sim.protocol import (
    ORACLE_BUDGETS,
    policy_specs,
    protocol_trace,
    sarathi_edf_spec,
    setting_for,
    vllm_defaults,
)


def test_every_oracle_budget_is_a_bucket_of_the_gpu_profiles():
    for name in ("a100-llama3-8b", "a100-llama2-7b", "h100-llama2-7b"):
        buckets = load_profile(name).buckets.token_buckets
        assert set(ORACLE_BUDGETS) <= set(buckets), name
    assert {384, 768} <= set(ORACLE_BUDGETS) and min(ORACLE_BUDGETS) == 128


def test_vllm_runs_with_its_own_defaults_for_the_device():
    assert vllm_defaults(load_profile("a100-llama3-8b")) == (2048, 256)
    assert vllm_defaults(load_profile("h100-llama2-7b")) == (8192, 1024)
    assert vllm_defaults(load_profile("cpu-builtin-tiny")) == (2048, 256)
    profile = load_profile("h100-llama2-7b")
    setting = setting_for("strict", profile, protocol_trace("azure_llm_2023_conv", 60))
    vllm = next(s for s in policy_specs(setting, ablations=False) if s.policy == "vllm")
    limits = build_scheduler(vllm, profile).limits
    assert (vllm.token_budget, vllm.max_seqs) == (8192, 1024)
    assert limits.max_num_batched_tokens == min(8192, profile.buckets.max_tokens)


def test_the_oracle_ladder_and_the_edf_row_build_schedulers_at_their_budgets():
    profile = load_profile("a100-llama3-8b")
    setting = setting_for("strict", profile, protocol_trace("azure_llm_2023_conv", 60))
    sarathi = [s for s in policy_specs(setting, ablations=False) if s.policy == "sarathi"]
    assert sorted({s.token_budget for s in sarathi}) == sorted(
        set(ORACLE_BUDGETS) | {setting.deployed_budget})
    edf = build_scheduler(sarathi_edf_spec(setting, 768), profile)
    assert edf.name == "sarathi-edf" and edf.limits.max_num_batched_tokens == 768
    assert edf.ttft_slo_s == setting.slo.ttft_s


def test_slo_floors_move_smoothly_with_the_prompt():
    """Without bucket padding a 1,032-token prompt's SLO is not 40% above a 1,012-token
    one's (the next A100 bucket after 1,024 is 1,536)."""
    from fbjax.sim.instance import unloaded_prefill_s

    profile = load_profile("a100-llama3-8b")
    lat, buckets = profile.latency, profile.buckets
    unpadded = [unloaded_prefill_s(lat, buckets, n, padded=False) for n in range(900, 1700, 4)]
    assert all(b >= a for a, b in zip(unpadded, unpadded[1:], strict=False))
    assert max(b / a for a, b in zip(unpadded, unpadded[1:], strict=False)) < 1.02
    padded = unloaded_prefill_s(lat, buckets, 1032)
    assert padded / unloaded_prefill_s(lat, buckets, 1012) > 1.3
    for n in (512, 1024, 1536):  # on a bucket, no padding either way
        assert unloaded_prefill_s(lat, buckets, n, padded=False) == unloaded_prefill_s(
            lat, buckets, n)


def test_the_three_slo_kinds():
    profile = load_profile("a100-llama3-8b")
    trace = protocol_trace("azure_llm_2023_conv", 60)
    prop, uniform, stall = (setting_for(n, profile, trace).slo
                            for n in ("strict", "uniform-strict", "stall-strict"))
    assert prop.ttft_s == uniform.ttft_s == stall.ttft_s
    assert prop.ttft_prefill_multiple == stall.ttft_prefill_multiple == 10.0
    assert uniform.ttft_prefill_multiple is None
    assert prop.tbt_s is None and uniform.tbt_s is None and stall.tbt_s == stall.tpot_s
    assert uniform.ttft_for(20_000, profile) == uniform.ttft_s < prop.ttft_for(20_000, profile)
    # FairBatching's stall cap is the stall SLO, and only there
    fb = {n: next(s for s in policy_specs(setting_for(n, profile, trace), ablations=False)
                  if s.name == "fairbatching").fairbatching for n in ("strict", "stall-strict")}
    assert fb["strict"].max_decode_stall_s is None
    assert fb["stall-strict"].max_decode_stall_s == stall.tbt_s


def test_a_trace_name_can_ask_for_gamma_arrivals():
    plain = protocol_trace("azure_llm_2023_conv", 120)
    bursty = protocol_trace("azure_llm_2023_conv@gamma0.5", 120)
    assert list(bursty.prompt_lens) == list(plain.prompt_lens)
    assert bursty.arrivals.tolist() != plain.arrivals.tolist()
    assert bursty.mean_rate == pytest.approx(plain.mean_rate, rel=0.25)
    for bad in ("azure_llm_2023_conv@poisson", "azure_llm_2023_conv@gammaX"):
        with pytest.raises(ValueError, match="gamma"):
            protocol_trace(bad, 60)
