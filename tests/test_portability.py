"""``python -m fbjax.portability --quick``: one row per device profile, the numbers in the
Markdown are the run's, and the study reads device facts from the profiles (a profile
twice as slow yields a proportionally larger time budget, the same code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fbjax.portability import study
from fbjax.profiling.store import load_profile
from fbjax.resources import PACKAGED_PROFILES_DIR as PROFILES_DIR
from fbjax.traces import available_traces

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACE = "azure_llm_2023_conv"

pytestmark = pytest.mark.skipif(TRACE not in available_traces(),
                                reason="needs ../shared/data/traces")


def test_quick_study_reports_every_profile_from_its_own_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fbjax.portability", "--quick", "--out",
                             str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    text = (tmp_path / "report.md").read_text()
    names = {r["profile"] for r in data["rows"]}
    assert {p.stem for p in PROFILES_DIR.glob("*.json")} <= names
    for r in data["rows"]:
        assert f"| {r['profile']} | {r['device']} | {r['model']} |" in text
        assert f"| {r['capacity_fairbatching']:.3f} |" in text
        assert r["tpot_budget_ms"] > 0 and r["fb_step_tokens"] > 0
    assert (tmp_path / "portability.png").stat().st_size > 10_000


def test_device_facts_come_from_the_profile():
    profile = load_profile("a100-llama3-8b")
    base = study("a100", profile, TRACE, 30.0, 0.2, "strict")
    slow = load_profile("a100-llama3-8b")
    for bucket in slow.latency.correction:  # every step predicted twice as long
        slow.latency.correction[bucket] = 2.0
    doubled = study("a100-x2", slow, TRACE, 30.0, 0.2, "strict")
    assert doubled["unloaded_tpot_ms"] == pytest.approx(2 * base["unloaded_tpot_ms"])
    assert doubled["tpot_budget_ms"] == pytest.approx(2 * base["tpot_budget_ms"])
