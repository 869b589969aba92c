"""Accelerator-portability study: ``python -m fbjax.portability --out docs/portability``.

The same scheduler code and the same evaluation protocol on every device profile: the
profile of each backend JAX sees on this machine (measured now with ``--measure``, else
the known ``<device>-<model>.json``) beside the GPU profiles built
from the shared data/profiles (and any TPU profile in fbjax/configs/profiles). For each it
reports the per-bucket latency curves, the FairBatching time budget that results (the
TPOT SLO a step must fit, and the knee token count it caps steps at), and
FairBatching's capacity gain over Sarathi, on the same trace slice with SLOs set
relative to that device's own unloaded latencies (so every device is judged by the
same rule). Device facts come only from the profiles.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from tqdm import tqdm

from fbjax.profiling.store import Profile, load_profile
from fbjax.resources import PACKAGED_PROFILES_DIR as PROFILES_DIR
from fbjax.sched.latency import StepFeatures
from fbjax.sim.experiment import capacity
from fbjax.sim.instance import build_scheduler
from fbjax.sim.protocol import (
    COARSE_ORACLE_BUDGETS,
    ORACLE_BUDGETS,
    policy_specs,
    protocol_trace,
    setting_for,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/portability", "Folder for report.md, results.json, plots.")
flags.DEFINE_bool("quick", False, "Short trace slice, coarse capacity search and oracle "
                  "ladder (CI).")
flags.DEFINE_bool("measure", False, "Profile this machine's backends now (python -m "
                  "fbjax.profile) instead of using their committed profiles.")
flags.DEFINE_float("measure_time_limit_s", 300.0, "Time limit of each --measure run.")
flags.DEFINE_list("profiles", None, "Profiles to compare (default: every one in "
                  "fbjax/configs/profiles, the measured ones replacing their namesakes).")
flags.DEFINE_string("trace", "azure_llm_2023_conv", "Trace for the capacity comparison.")
flags.DEFINE_string("setting", "strict", "SLO setting (fbjax/sim/protocol.py).")


def this_machine_profiles(out: Path, measure: bool, time_limit_s: float) -> dict[str, Path]:
    """Profiles of the backends JAX sees here: measured now, or the committed ones."""
    import jax

    from fbjax.profiling.device import current_device_key
    from fbjax.profiling.store import find_profile, model_key

    found = {}
    for platform in sorted({d.platform for d in jax.devices()}):
        device = current_device_key() if platform == jax.devices()[0].platform else platform
        name = f"{device}-{model_key(None)}"
        if measure:
            path = out / f"{name}.json"
            cmd = [sys.executable, "-m", "fbjax.profile", "--out", str(path),
                   "--time_limit_s", str(time_limit_s)]
            print("measuring:", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True, env={**__import__("os").environ,
                                                 "JAX_PLATFORMS": platform})
        else:
            path = find_profile(device, model_key(None))
        if path is not None and path.exists():
            found[name] = path
        else:
            print(f"no profile for {name} (run with --measure)", file=sys.stderr)
    return found


def latency_curves(profile: Profile) -> dict[str, list[tuple[int, float]]]:
    """Predicted step time (ms) of a full prefill chunk and of a batch of decodes at
    1024 tokens of context, per token bucket, on the bucket the engine would pick."""
    b = profile.buckets
    prefill, decode = [], []
    for tokens in b.token_buckets:
        feats = StepFeatures.of_chunks([(tokens, tokens, False)])
        prefill.append((tokens, 1e3 * profile.latency.predict(b.pick(tokens, 1), feats)))
        seqs = min(tokens, b.max_seqs)
        feats = StepFeatures.of_chunks([(1, 1024, True)] * seqs)
        decode.append((seqs, 1e3 * profile.latency.predict(b.pick(seqs, seqs), feats)))
    return {"prefill": prefill, "decode": sorted(set(decode))}


def study(name: str, profile: Profile, trace_name: str, duration_s: float, tol: float,
          setting_name: str, oracle_budgets: tuple[int, ...] = ORACLE_BUDGETS
          ) -> dict[str, Any]:
    trace = protocol_trace(trace_name, duration_s)
    setting = setting_for(setting_name, profile, trace)
    specs = {s.name: s for s in policy_specs(setting, oracle=True, ablations=False,
                                             oracle_budgets=oracle_budgets)}
    deployed = next(iter(specs))
    fb = build_scheduler(specs["fairbatching"], profile)
    caps = {n: capacity(trace, s, profile, setting.slo, tol=tol, lo=0.05, hi=1.0).rate_scale
            for n, s in specs.items() if n.startswith(("sarathi", "fairbatching"))}
    oracle = max((n for n in caps if specs[n].policy == "sarathi"), key=caps.get)
    meta = profile.latency.metadata
    return {
        "profile": name, "device": meta.get("device"), "model": meta.get("model"),
        "source": meta.get("source", "")[:120],
        "unloaded_ttft_ms": setting.unloaded_ttft_s * 1e3,
        "unloaded_tpot_ms": setting.unloaded_tpot_s * 1e3,
        "tpot_budget_ms": setting.slo.tpot_s * 1e3, "fb_step_tokens": fb.step_tokens,
        "sarathi_deployed_budget": setting.deployed_budget, "oracle": oracle,
        "capacity_fairbatching": caps["fairbatching"], "capacity_deployed": caps[deployed],
        "capacity_oracle": caps[oracle],
        "gain_vs_deployed": _gain(caps["fairbatching"], caps[deployed]),
        "gain_vs_oracle": _gain(caps["fairbatching"], caps[oracle]),
        "curves": latency_curves(profile),
    }


def _gain(a: float, b: float) -> float | None:
    return a / b - 1 if b else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in rows:
        xs, ys = zip(*r["curves"]["prefill"], strict=True)
        axes[0].plot(xs, ys, "o-", label=r["profile"])
        xs, ys = zip(*r["curves"]["decode"], strict=True)
        axes[1].plot(xs, ys, "o-", label=r["profile"])
    axes[0].set(xscale="log", yscale="log", xlabel="prefill tokens in the step",
                ylabel="predicted step time (ms)", title="prefill step per token bucket")
    axes[1].set(xscale="log", yscale="log", xlabel="decodes in the step (1024 context)",
                ylabel="predicted step time (ms)", title="decode step per bucket")
    names = [r["profile"] for r in rows]
    axes[2].bar(names, [100 * (r["gain_vs_oracle"] or 0) for r in rows])
    axes[2].set(ylabel="FairBatching capacity gain vs Sarathi oracle (%)",
                title=f"capacity gain on {meta['trace']}")
    axes[2].tick_params(axis="x", rotation=15, labelsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "portability.png", dpi=110)
    plt.close(fig)
    lines = [
        "# Accelerator portability", "",
        f"Regenerate with `{meta['command']}` ({meta['elapsed_s']:.0f} s). The same "
        "schedulers and evaluation protocol on every device profile; every number is "
        "formatted from this run's `results.json`. SLOs are multiples of each device's "
        f"own unloaded latencies (setting `{meta['setting']}`), on the first "
        f"{meta['duration_s']:g} s of `{meta['trace']}`.", "",
        "| profile | device | model | unloaded TTFT ms | unloaded TPOT ms | FB time budget "
        "(TPOT SLO) ms | FB step cap (knee) tokens | Sarathi deployed budget | capacity FB "
        "| capacity Sarathi deployed | capacity Sarathi oracle | FB gain vs deployed "
        "| FB gain vs oracle |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['device']} | {r['model']} | {r['unloaded_ttft_ms']:.1f} | "
            f"{r['unloaded_tpot_ms']:.2f} | {r['tpot_budget_ms']:.1f} | {r['fb_step_tokens']} "
            f"| {r['sarathi_deployed_budget']} | {r['capacity_fairbatching']:.3f} | "
            f"{r['capacity_deployed']:.3f} | {r['capacity_oracle']:.3f} | "
            f"{_pct(r['gain_vs_deployed'])} | {_pct(r['gain_vs_oracle'])} |")
    lines += ["", "![latency curves and gains](portability.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main(argv: list[str]) -> int:
    del argv
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    duration_s, tol = (30.0, 0.10) if FLAGS.quick else (300.0, 0.03)
    budgets = COARSE_ORACLE_BUDGETS if FLAGS.quick else ORACLE_BUDGETS
    start = time.perf_counter()
    try:
        protocol_trace(FLAGS.trace, 1.0)  # a bad trace name fails before any work
        local = this_machine_profiles(out, FLAGS.measure, FLAGS.measure_time_limit_s)
        names = FLAGS.profiles or sorted({p.stem for p in PROFILES_DIR.glob("*.json")}
                                         | set(local))
        profiles = {n: load_profile(local.get(n, n)) for n in names}
    except (ValueError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [study(n, p, FLAGS.trace, duration_s, tol, FLAGS.setting, budgets)
            for n, p in tqdm(profiles.items(), desc="portability", unit="profile")]
    meta = {"command": "python -m fbjax.portability " + shlex.join(sys.argv[1:]),
            "trace": FLAGS.trace, "setting": FLAGS.setting, "duration_s": duration_s,
            "oracle_budgets": list(budgets),
            "measured_here": sorted(local), "elapsed_s": time.perf_counter() - start}
    write_outputs(rows, meta, out)
    print(f"wrote {out / 'report.md'} ({len(rows)} profiles)")
    return 0


if __name__ == "__main__":
    app.run(main)
