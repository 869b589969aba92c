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
                             TRACE, "--out", str(out), "--cells_dir", str(out / "cells")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_resumed_run_reuses_the_finished_cells(report, tmp_path):
    """With --resume a cell saved by an earlier run of the same mode is read back, not
    searched again: a saved result altered on disk shows up in the new report."""
    data = json.loads((report / "results.json").read_text())
    cell = report / "cells" / f"{TRACE}-{data['meta']['settings'][0]}.json"
    saved = json.loads(cell.read_text())
    saved["result"]["capacity"]["fairbatching"] = 123.0
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / cell.name).write_text(json.dumps(saved))
    result = subprocess.run([sys.executable, "-m", "fbjax.reproduce", "--quick", "--traces",
                             TRACE, "--settings", data["meta"]["settings"][0], "--out",
                             str(tmp_path), "--cells_dir", str(tmp_path / "cells"),
                             "--resume"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "| fairbatching | 123.000 |" in text
    assert "1 of 1 (trace, setting) cells read back" in text  # the report says so


def test_writes_report_json_and_plots(report):
    names = {p.name for p in report.iterdir()}
    data = json.loads((report / "results.json").read_text())
    plots = {f"{TRACE}-{setting}-latency.png" for setting in data["meta"]["settings"]}
    assert {"report.md", "results.json", "capacity.png", *plots} <= names
    assert all((report / n).stat().st_size > 10_000 for n in names if n.endswith(".png"))


def test_report_numbers_come_from_the_run(report):
    data = json.loads((report / "results.json").read_text())
    text = (report / "report.md").read_text()
    assert [run["setting"] for run in data["results"]] == data["meta"]["settings"]
    for run in data["results"]:
        for policy, value in {**run["capacity"], **run["cluster_capacity"]}.items():
            assert f"| {policy} | {value:.3f} |" in text
        for row in run["sweep"]:
            assert f"| {row['p99_ttft_ms']:.0f} | {row['p99_tbt_ms']:.0f} |" in text
    # The same search, run here, gives the number the report printed.
    run = data["results"][0]
    profile = load_profile(data["meta"]["profile"])
    trace = protocol_trace(TRACE, data["meta"]["duration_s"])
    setting = setting_for(run["setting"], profile, trace)
    fb = next(s for s in policy_specs(setting, oracle=False) if s.name == "fairbatching")
    again = capacity(trace, fb, profile, setting.slo, tol=0.10, lo=0.05, hi=1.0)
    assert again.rate_scale == pytest.approx(run["capacity"]["fairbatching"])


def test_the_headline_baseline_is_the_sarathi_oracle(report):
    """Every headline figure is against the best Sarathi budget of the run, measured at
    its capacity; Sarathi as deployed appears only where it is that best budget."""
    data = json.loads((report / "results.json").read_text())
    text = (report / "report.md").read_text()
    headline = text[text.index("## Headline"):text.index("The paper (arXiv")]
    for run in data["results"]:
        sarathi = {p: c for p, c in run["capacity"].items() if p.startswith("sarathi-")
                   and not p.startswith("sarathi-edf")}
        for budget in data["meta"]["oracle_budgets"]:  # the whole ladder was searched
            assert (f"sarathi-{budget}" in sarathi
                    or run["deployed"] == f"sarathi-deployed({budget})")
        assert run["capacity"][run["oracle"]] == max(sarathi.values())
        oracle_cap = run["capacity"][run["oracle"]]
        at_oracle = {r["policy"]: r for r in run["sweep"] if r["rate_scale"] == oracle_cap}
        assert run["p99_ttft_oracle_ms"] == at_oracle[run["oracle"]]["p99_ttft_ms"]
        assert run["p99_ttft_fb_ms"] == at_oracle["fairbatching"]["p99_ttft_ms"]
        assert run["fb_gain_vs_oracle"] == pytest.approx(
            run["capacity"]["fairbatching"] / oracle_cap - 1)
        row = next(line for line in headline.splitlines()
                   if line.startswith(f"| {run['trace']} | {run['setting']} |"))
        assert f"| {run['oracle']} |" in row
        if run["deployed"] != run["oracle"]:
            assert run["deployed"] not in headline
        # the cluster baseline too: the oracle behind a load-aware router, not round robin
        assert run["cluster_gain"] == pytest.approx(
            run["cluster_capacity"]["fairbatching+pab"]
            / run["cluster_capacity"]["sarathi-oracle+least_requests"] - 1)


def test_bad_trace_is_a_clear_cli_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fbjax.reproduce", "--quick", "--traces",
                             "no_such_trace", "--out", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no_such_trace" in result.stderr
