"""``python -m fbjax.reproduce --quick``: it writes the report, the plots and the JSON, and
the report's numbers are the run's (recomputed here independently, not typed in)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fbjax.profiling.store import load_profile
from fbjax.sim.experiment import capacity
from fbjax.sim.protocol import policy_specs, protocol_trace, setting_for
from fbjax.traces import available_traces

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACE = "azure_llm_2023_code"

pytestmark = pytest.mark.skipif(TRACE not in available_traces(),
                                reason="needs ../shared/data/traces")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = subprocess.run([sys.executable, "-m", "fbjax.reproduce", "--quick", "--traces",
                             TRACE, "--out", str(out)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_writes_report_json_and_plots(report):
    names = {p.name for p in report.iterdir()}
    assert {"report.md", "results.json", "capacity.png", f"{TRACE}-latency.png"} <= names
    assert all((report / n).stat().st_size > 10_000 for n in names if n.endswith(".png"))


def test_report_numbers_come_from_the_run(report):
    data = json.loads((report / "results.json").read_text())
    text = (report / "report.md").read_text()
    (run,) = data["results"]
    for policy, value in {**run["capacity"], **run["cluster_capacity"]}.items():
        assert f"| {policy} | {value:.3f} |" in text
    for row in run["sweep"]:
        assert f"| {row['p99_ttft_ms']:.0f} |" in text
    assert f"{run['p99_ttft_reduction_x']:.2f}x" in text
    # The same search, run here, gives the number the report printed.
    profile = load_profile(data["meta"]["profile"])
    trace = protocol_trace(TRACE, data["meta"]["duration_s"])
    setting = setting_for(data["meta"]["setting"], profile, trace)
    fb = next(s for s in policy_specs(setting, oracle=False) if s.name == "fairbatching")
    again = capacity(trace, fb, profile, setting.slo, tol=0.10, lo=0.05, hi=1.0)
    assert again.rate_scale == pytest.approx(run["capacity"]["fairbatching"])


def test_bad_trace_is_a_clear_cli_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fbjax.reproduce", "--quick", "--traces",
                             "no_such_trace", "--out", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no_such_trace" in result.stderr
