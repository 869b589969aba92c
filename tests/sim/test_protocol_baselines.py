"""The baselines the protocol compares against are the ones users would run: Sarathi
over a fine ladder of budgets that are real buckets, vLLM with its own defaults for the
device, Sarathi with deadline-ordered admission."""

from __future__ import annotations

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
