"""Does the simulator predict the real engine? The same trace slice through both.

One Azure conv slice, lengths scaled to the built-in model's context, at a rate near
this machine's capacity (``--load`` x the simulator's capacity for the first policy,
99% SLO attainment, unless ``--rate_scale`` is given), is replayed

* through the simulator with a latency profile, and
* through the real engine (real tokens, wall-clock time) with the same profile,

for each policy, and the TTFT / TPOT p50 / p99 of the two are compared (relative
difference, engine as the reference). The profile is the recorded one
(``<device>-<model>.json``, see ``fbjax.profiling.store``) brought up to the machine's present state
by ``--calibrate_s`` seconds of the trace just before the slice replayed on the engine
with online refinement on (0 disables it), which also measures the engine's host work
per step (scheduling, batch building, fetching samples; the simulator adds it to every
step): on a CPU shared with other jobs the step
times drift by 2x or more over minutes, and a profile recorded earlier describes
another machine state. Both executors then start from that calibrated profile (the
engine keeps refining it as it runs). Since the machine's speed still drifts during
the run, the table also shows ``sim_matched``: the simulator with the calibrated profile
scaled by one factor, the ratio of the engine's measured to predicted step time summed
over that very run, with the host work per step measured in that run; it separates
the simulator's fidelity (the same scheduling dynamics
at the same machine speed) from the machine's drift. CPU timings on a shared machine
are noisy: rerun before trusting a single figure.

    python scripts/bench_sim_vs_engine.py --duration_s 60 --policies sarathi,fairbatching
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_string("trace", "azure_llm_2023_conv", "Trace name or path.")
flags.DEFINE_float("start_s", 600.0, "Slice start (seconds into the trace).")
flags.DEFINE_float("duration_s", 60.0, "Slice length (seconds of trace time).")
flags.DEFINE_list("policies", ["sarathi", "fairbatching"], "Policies to compare.")
flags.DEFINE_float("rate_scale", None, "Arrival-rate scale; default: --load x capacity.")
flags.DEFINE_float("load", 0.9, "Fraction of the simulated capacity to run at.")
flags.DEFINE_string("length_scale", "auto", "Prompt/output length factor or 'auto'.")
flags.DEFINE_float("slo_ttft_ms", 1500.0, "TTFT SLO (ms).")
flags.DEFINE_float("slo_tpot_ms", 60.0, "TPOT SLO (ms).")
flags.DEFINE_integer("sarathi_budget", 128, "Sarathi token budget.")
flags.DEFINE_string("profile", None, "Engine profile (default the known <device>-"
                    "<model>.json).")
flags.DEFINE_float("calibrate_s", 20.0, "Seconds of trace before the slice replayed on the "
                   "engine first, to refine the profile online (0: use it as recorded).")
flags.DEFINE_string("json", None, "Write all figures here.")

METRICS = (("TTFT p50", "ttft", 50), ("TTFT p99", "ttft", 99), ("TPOT p50", "tpot", 50),
           ("TPOT p99", "tpot", 99))


def main(argv):
    del argv
    from fbjax.profiling.store import Profile
    from fbjax.replay.engine import (
        calibrated_slice,
        engine_profile,
        relative_difference,
        replay_engine,
        scheduler_config,
        sim_policy_spec,
        step_time_summary,
    )
    from fbjax.sim.experiment import SLO, capacity, simulate

    slo = SLO(FLAGS.slo_ttft_ms / 1e3, FLAGS.slo_tpot_ms / 1e3)
    run = calibrated_slice(FLAGS.trace, FLAGS.start_s, FLAGS.duration_s, FLAGS.length_scale,
                           FLAGS.calibrate_s, slo, FLAGS.profile)
    engine, trace, scaling = run.engine, run.trace, run.scaling
    profile_path, sim_profile = run.profile_path, run.sim_profile
    base, calibrated = sim_profile, sim_profile.latency

    def spec_for(policy):
        cfg = dataclasses.replace(
            scheduler_config(engine, policy, slo, token_budget=FLAGS.sarathi_budget),
            profile=str(profile_path))
        return cfg, sim_policy_spec(dataclasses.replace(engine.config, scheduler=cfg), slo)

    rate = FLAGS.rate_scale
    if rate is None:
        cap = capacity(trace, spec_for(FLAGS.policies[0])[1], sim_profile, slo, lo=0.25,
                       hi=16.0)
        rate = FLAGS.load * cap.rate_scale
        print(f"simulated capacity of {FLAGS.policies[0]}: rate scale {cap.rate_scale:.2f}; "
              f"running at {FLAGS.load} x that = {rate:.2f}")
    run_trace = trace.scaled(rate)
    print(f"{run_trace.name}: {len(run_trace)} requests over {run_trace.duration_s:.0f} s "
          f"({run_trace.mean_rate:.2f} req/s); {scaling.describe()}; SLO {slo.describe()}; "
          f"profile {engine.profile_path}", flush=True)

    rows, figures = [], {}
    for policy in FLAGS.policies:
        cfg, spec = spec_for(policy)
        sim = simulate(run_trace, spec, sim_profile, slo)
        engine.use_scheduler(cfg)
        start = time.monotonic()
        stats: dict = {}
        real = replay_engine(engine, run_trace, slo, engine_profile(engine), policy=policy,
                             reference=calibrated, stats=stats)
        wall = time.monotonic() - start
        speed = stats["measured_s"] / max(stats["predicted_s"], 1e-12)
        host_s = (stats["step_wall_s"] - stats["measured_s"]) / max(stats["num_steps"], 1)
        matched = copy.deepcopy(calibrated)
        matched.correction = {b: speed for b in matched.correction}
        sim_matched = simulate(run_trace, spec, Profile(base.name, matched, base.buckets,
                                                        base.kv_capacity_tokens,
                                                        base.page_size, host_s), slo)
        fig = {"engine_wall_s": wall, "engine_steps": step_time_summary(real.result.steps),
               "sim_steps": step_time_summary(sim.result.steps),
               "online_updates": engine.latency.num_updates,
               "outliers_rejected": engine.latency.num_outliers,
               "measured_over_predicted": speed,
               "host_overhead_ms_per_step": host_s * 1e3}
        for label, outcome in (("engine", real), ("sim", sim), ("sim_matched", sim_matched)):
            s = outcome.summary
            fig[label] = {name: getattr(s, attr).p(p) for name, attr, p in METRICS}
            fig[label]["SLO attain"] = s.slo_attainment
        for name, _, _ in METRICS:
            fig.setdefault("rel_diff", {})[name] = relative_difference(fig["sim"][name],
                                                                       fig["engine"][name])
            fig.setdefault("rel_diff_matched", {})[name] = relative_difference(
                fig["sim_matched"][name], fig["engine"][name])
        figures[policy] = fig
        for label in ("engine", "sim", "sim_matched"):
            v = fig[label]
            diff = "" if label == "engine" else " | ".join(
                f"{fig['rel_diff' if label == 'sim' else 'rel_diff_matched'][n] * 100:.0f}%"
                for n, _, _ in METRICS)
            rows.append(f"| {policy} | {label} | " + " | ".join(
                f"{v[n]:.1f}" for n, _, _ in METRICS) + f" | {v['SLO attain']:.3f} | "
                + (diff or "reference") + " |")
        print(f"{policy}: engine {fig['engine_steps']['steps']:.0f} steps (p50 "
              f"{fig['engine_steps']['p50_ms']:.1f} ms), sim {fig['sim_steps']['steps']:.0f} "
              f"steps (p50 {fig['sim_steps']['p50_ms']:.1f} ms); "
              f"{fig['online_updates']} online updates, {fig['outliers_rejected']} outliers; "
              f"engine steps took {speed:.2f}x the calibrated profile's prediction, plus "
              f"{fig['host_overhead_ms_per_step']:.2f} ms of host work each (sim_matched "
              "uses both)",
              flush=True)
    print("\n| policy | executor | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
          "| SLO attain | |sim - engine| / engine (TTFT p50, p99, TPOT p50, p99) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps({
            "trace": run_trace.name, "rate_scale": rate, "length_scaling": scaling.describe(),
            "slo": slo.describe(), "profile": str(base.name), "calibrate_s": FLAGS.calibrate_s,
            "results": figures},
            indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
