"""scripts/device_check.py, the prepared accelerator check, rehearsed on CPU.

The rehearsal runs every stage end to end at toy sizes (the kernels interpreted, the
built-in model), so the script is known to work before a GPU or TPU is lent for a few
minutes; a budget too small for it must skip stages and say so, not overrun. Also the
table of HBM peaks that stage 3's "% of peak" divides by.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fbjax.profiling.device import hbm_peak_tbs
from fbjax.sched.latency import LatencyModel

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "device_check.py"
STAGES = ("environment", "conformance", "kernels", "engine", "profile", "replay")
TABLE_HEADER = "| stage | status | seconds | result |"


def run_check(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    paths = [str(REPO_ROOT), str(REPO_ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    return subprocess.run([sys.executable, str(SCRIPT), "--rehearse", f"--out={out}", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stages_of(out: Path) -> dict[str, dict]:
    results = json.loads((out / "results.json").read_text())
    return {s["name"]: s for s in results["stages"]}


@pytest.mark.slow
def test_rehearsal_runs_every_stage(tmp_path):
    start = time.monotonic()
    proc = run_check(tmp_path, "--budget_s=240", timeout=300)
    wall = time.monotonic() - start
    stages = stages_of(tmp_path)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(STAGES, "ok"), log
    assert proc.returncode == 0, log
    # the summary table, every stage in it
    assert TABLE_HEADER in proc.stdout
    for i, name in enumerate(STAGES, 1):
        assert f"| {i}. {name} | ok |" in proc.stdout
    # what each stage measured
    assert stages["environment"]["figures"]["pallas_lowers"] == "yes"  # Triton, no GPU needed
    assert stages["conformance"]["figures"]["passed"] >= 1
    assert stages["conformance"]["figures"]["mode"].startswith("interpreted")
    rows = stages["kernels"]["figures"]["rows"]
    assert {r["impl"] for r in rows} == {"reference", "pallas_gpu"}
    assert all(r["ms"] > 0 and r["error"] is None for r in rows)
    greedy = stages["engine"]["figures"]["greedy"]
    assert all(g["equal"] == g["of"] for g in greedy.values())
    assert {r["streams"] for r in stages["engine"]["figures"]["runs"]} == {1, 4}
    profile = tmp_path / "profiles" / "cpu-builtin-tiny.json"
    assert stages["profile"]["figures"]["path"] == str(profile)
    assert LatencyModel.load(profile).heldout is not None
    assert "fbjax/configs/profiles/cpu-builtin-tiny.json" in stages["profile"]["details"]
    results = stages["replay"]["figures"]["results"]
    assert set(results) == {"sarathi", "fairbatching"}
    assert all(r["engine"]["requests"] > 0 for r in results.values())
    # the report to commit, named after the device
    report = (tmp_path / "cpu.md").read_text()
    assert TABLE_HEADER in report and "## 6. FairBatching vs Sarathi" in report
    assert not (tmp_path / "device.md").exists()
    print(f"rehearsal wall time {wall:.1f} s")


def test_a_budget_too_small_skips_stages_and_says_so(tmp_path):
    budget = 4.0
    proc = run_check(tmp_path, f"--budget_s={budget}", timeout=120)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["elapsed_s"] <= budget + 1.5  # the watchdog stops a running stage
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: stopped at the budget
    assert TABLE_HEADER in proc.stdout
    stages = list(stages_of(tmp_path).values())
    assert [s["name"] for s in stages] == list(STAGES)
    skipped = [s for s in stages if s["status"] == "skipped"]
    assert skipped
    for s in skipped:
        assert "budget" in s["summary"], s
    for s in stages:
        if s["status"] == "failed":
            assert "stopped" in s["error"], s


@pytest.mark.parametrize(("kind", "tbs"), [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.0), ("NVIDIA A100-SXM4-40GB", 1.555), ("NVIDIA L4", 0.3),
    ("NVIDIA L40S", 0.864), ("TPU v4", 1.2), ("TPU v5 lite", 0.819), ("TPU v5", 2.765),
    ("TPU v6 lite", 1.64), ("cpu", None), ("Tesla V100-SXM2-16GB", None),
])
def test_hbm_peak_of_known_cards(kind, tbs):
    assert hbm_peak_tbs(kind) == tbs
