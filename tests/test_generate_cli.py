"""The offline CLI as a user runs it: a real subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fbjax.sched.request import SamplingParams

SMALL = ["--model", "builtin-tiny", "--token_buckets", "16,32", "--seq_buckets", "4",
         "--num_pages", "64", "--max_model_len", "256"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fbjax.generate", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_completion(builtin_model):
    from fbjax.engine.engine import LLMEngine
    from tests.conftest import engine_config

    proc = run_cli("--prompt", "Hello, fbjax", "--max_tokens", "12", *SMALL)
    assert proc.returncode == 0, proc.stderr
    engine = LLMEngine(engine_config(), loaded=builtin_model)
    expected = engine.generate(["Hello, fbjax"], SamplingParams(max_tokens=12,
                                                                temperature=0.0))[0].text
    assert proc.stdout == expected + "\n"
    assert "compiled 2 bucket executables" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--prompt", "x"], "model path not found"),
    (["--prompt", "x", "--max_tokens", "0"], "max_tokens"),
    (["--prompt", "x", "--top_p", "1.5"], "top_p"),
    (["--prompt", "x", "--token_buckets", "16,abc"], "--token_buckets"),
    (["--prompt", "x", "--seq_buckets", "8,4"], "seq_buckets"),
    (["--prompt", "x", "--scheduler", "nope"], "unknown scheduler"),
])
def test_bad_flags_are_clear_errors(args, message):
    proc = run_cli("--model", "builtin-tiny", *args)  # a later --model wins
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],,}')
    proc = run_cli("--model", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2
    assert "config.json" in proc.stderr and "malformed JSON" in proc.stderr
