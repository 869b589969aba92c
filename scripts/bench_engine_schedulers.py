"""FairBatching vs Sarathi-Serve on the real engine, side by side in one run.

An Azure conv slice (lengths scaled to the built-in model's context) at a load where
Sarathi misses its TTFT SLO: ``--load`` x Sarathi's capacity as the simulator finds it
on the engine's profile (99% SLO attainment), unless ``--rate_scale`` is given. The profile is first
brought up to the machine's present state by ``--calibrate_s`` seconds of the trace
before the slice, replayed with online refinement (step times on a shared CPU drift).
Both policies then run the very same requests on one compiled engine (real tokens,
wall-clock time), one after the other, and the table shows P50/P99 TTFT, P99 TPOT,
TTFT/TPOT/SLO attainment of each, with the simulator's prediction beside each row.
CPU timings on a shared machine are noisy: rerun before trusting a single figure.

    python scripts/bench_engine_schedulers.py --duration_s 60 --load 1.3
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_string("trace", "azure_llm_2023_conv", "Trace name or path.")
flags.DEFINE_float("start_s", 600.0, "Slice start (seconds into the trace).")
flags.DEFINE_float("duration_s", 60.0, "Slice length (seconds of trace time).")
flags.DEFINE_float("rate_scale", None, "Arrival-rate scale; default: --load x Sarathi's "
                   "simulated capacity.")
flags.DEFINE_float("load", 1.3, "Multiple of Sarathi's simulated capacity to run at.")
flags.DEFINE_string("length_scale", "auto", "Prompt/output length factor or 'auto'.")
flags.DEFINE_float("slo_ttft_ms", 1500.0, "TTFT SLO (ms).")
flags.DEFINE_float("slo_tpot_ms", 60.0, "TPOT SLO (ms).")
flags.DEFINE_integer("sarathi_budget", 128, "Sarathi token budget.")
flags.DEFINE_string("profile", None, "Engine profile (default the known <device>-"
                    "<model>.json).")
flags.DEFINE_float("calibrate_s", 20.0, "Seconds of trace before the slice replayed on the "
                   "engine first, to refine the profile online (0: use it as recorded).")
flags.DEFINE_string("json", None, "Write all figures here.")


def main(argv):
    del argv
    from fbjax.replay.engine import (
        calibrated_slice,
        engine_profile,
        replay_engine,
        scheduler_config,
        sim_policy_spec,
    )
    from fbjax.sim.experiment import SLO, capacity, simulate

    slo = SLO(FLAGS.slo_ttft_ms / 1e3, FLAGS.slo_tpot_ms / 1e3)
    run = calibrated_slice(FLAGS.trace, FLAGS.start_s, FLAGS.duration_s, FLAGS.length_scale,
                           FLAGS.calibrate_s, slo, FLAGS.profile)
    engine, trace, scaling = run.engine, run.trace, run.scaling
    profile_path, sim_profile = run.profile_path, run.sim_profile
    policies = ("sarathi", "fairbatching")
    configs = {p: dataclasses.replace(scheduler_config(engine, p, slo,
                                                       token_budget=FLAGS.sarathi_budget),
                                      profile=str(profile_path))
               for p in policies}
    specs = {p: sim_policy_spec(dataclasses.replace(engine.config, scheduler=c), slo)
             for p, c in configs.items()}
    rate = FLAGS.rate_scale
    if rate is None:
        cap = capacity(trace, specs["sarathi"], sim_profile, slo, lo=0.25, hi=16.0)
        rate = FLAGS.load * cap.rate_scale
        print(f"simulated Sarathi capacity: rate scale {cap.rate_scale:.2f}; running at "
              f"{FLAGS.load} x that = {rate:.2f}")
    run_trace = trace.scaled(rate)
    print(f"{run_trace.name}: {len(run_trace)} requests over {run_trace.duration_s:.0f} s "
          f"({run_trace.mean_rate:.2f} req/s); {scaling.describe()}; SLO {slo.describe()}; "
          f"Sarathi budget {FLAGS.sarathi_budget} tokens; profile {engine.profile_path}",
          flush=True)
    rows, figures = [], {}
    for policy in policies:
        sim = simulate(run_trace, specs[policy], sim_profile, slo)
        engine.use_scheduler(configs[policy])
        stats: dict = {}
        real = replay_engine(engine, run_trace, slo, engine_profile(engine), policy=policy,
                             reference=sim_profile.latency, stats=stats)
        figures[policy] = {"engine_speed_vs_profile": stats["measured_s"]
                           / max(stats["predicted_s"], 1e-12)}
        for label, o in (("engine", real), ("simulator", sim)):
            s = o.summary
            f = {"ttft_p50_ms": s.ttft.p(50), "ttft_p99_ms": s.ttft.p(99),
                 "tpot_p99_ms": s.tpot.p(99), "ttft_attain": s.ttft_attainment,
                 "tpot_attain": s.tpot_attainment, "slo_attain": s.slo_attainment,
                 "prefill_share": o.share.prefill_share,
                 "preemptions": s.num_preemptions}
            figures[policy][label] = f
            rows.append(f"| {policy} | {label} | {f['ttft_p50_ms']:.0f} | {f['ttft_p99_ms']:.0f} "
                        f"| {f['tpot_p99_ms']:.1f} | {f['ttft_attain']:.3f} "
                        f"| {f['tpot_attain']:.3f} | {f['slo_attain']:.3f} "
                        f"| {f['preemptions']} |")
        print(f"{policy}: engine done ({len(real.result.steps)} steps; runner time "
              f"{figures[policy]['engine_speed_vs_profile']:.2f}x the calibrated profile's "
              "prediction)", flush=True)
    print("\n| policy | executor | P50 TTFT ms | P99 TTFT ms | P99 TPOT ms | TTFT attain "
          "| TPOT attain | SLO attain | preemptions |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    e = {p: figures[p]["engine"] for p in policies}
    print(f"\nengine: P99 TTFT sarathi/fairbatching = "
          f"{e['sarathi']['ttft_p99_ms'] / max(e['fairbatching']['ttft_p99_ms'], 1e-9):.2f}x; "
          f"SLO attainment {e['sarathi']['slo_attain']:.3f} -> "
          f"{e['fairbatching']['slo_attain']:.3f}")
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps({
            "trace": run_trace.name, "rate_scale": rate, "length_scaling": scaling.describe(),
            "slo": slo.describe(), "profile": sim_profile.name, "calibrate_s": FLAGS.calibrate_s,
            "results": figures},
            indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
