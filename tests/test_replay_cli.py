"""``python -m fbjax.replay`` as a user runs it, on a short slice of a real trace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fbjax.traces import traces_dir


def run_replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fbjax.replay", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def conv_trace():
    path = traces_dir() / "azure_llm_2023_conv.csv"
    if not path.exists():
        pytest.skip(f"shared traces not found at {path} (set FBJAX_SHARED)")
    return "azure_llm_2023_conv"


def test_replay_reports_every_policy_and_writes_json_and_plot(conv_trace, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "cdf.png"
    proc = run_replay("--trace", conv_trace, "--duration_s", "60", "--scheduler",
                      "vllm,sarathi,fairbatching", "--sarathi_budget", "512",
                      "--json", str(out_json), "--plot", str(out_png))
    assert proc.returncode == 0, proc.stderr
    for name in ("vllm-512", "sarathi-512", "fairbatching"):
        assert f"| {name} |" in proc.stdout
    assert "Serving Benchmark Result" in proc.stdout
    data = json.loads(out_json.read_text())
    assert set(data["results"]) == {"vllm-512", "sarathi-512", "fairbatching"}
    n = data["num_requests"]
    assert n > 100
    assert all(r["completed"] == n for r in data["results"].values())
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--trace", "no_such_trace"], "available"),
    (["--trace", "azure_llm_2023_conv", "--scheduler", "fifo"], "--scheduler"),
    (["--trace", "azure_llm_2023_conv", "--profile", "tpu-v9"], "profile not found"),
    (["--trace", "azure_llm_2023_conv", "--sarathi_budget", "lots"], "--sarathi_budget"),
    (["--trace", "azure_llm_2023_conv", "--engine", "--capacity"], "--capacity"),
    (["--trace", "azure_llm_2023_conv", "--engine", "--length_scale", "lots"],
     "--length_scale"),
    (["--trace", "azure_llm_2023_conv", "--engine", "--profile", "a100-llama3-8b"],
     "--force_profile"),
])
def test_bad_flags_are_named(conv_trace, args, message):
    proc = run_replay(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_trace_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:17:03.9799600,10,5\n"
                   "2023-11-16 18:17:04.0319600,ten,8\n")
    proc = run_replay("--trace", str(bad))
    assert proc.returncode == 2
    assert "bad.csv" in proc.stderr and ":3" in proc.stderr


def test_engine_replay_reports_both_policies_and_the_length_scaling(conv_trace, tmp_path):
    out_json = tmp_path / "e.json"
    proc = run_replay("--trace", conv_trace, "--engine", "--start_s", "600", "--duration_s", "2",
                      "--length_scale", "0.25", "--token_buckets", "16,64,256",
                      "--seq_buckets", "4,16",
                      "--scheduler", "sarathi,fairbatching", "--sarathi_budget", "128",
                      "--slo_ttft_ms", "2000", "--slo_tpot_ms", "100", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    assert "real engine" in proc.stdout and "lengths x0.250 to fit the model's 2048-token" \
        " context" in proc.stdout
    for name in ("sarathi", "fairbatching"):
        assert f"| {name} |" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["executor"] == "engine" and data["length_scaling"]["factor"] == 0.25
    n = data["num_requests"]
    assert n > 3 and all(r["completed"] == n for r in data["results"].values())
