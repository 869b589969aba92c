"""Cluster capacity in the simulator: scheduler x router combinations over N instances.

For each trace and instance count, the highest rate scale (x the trace's own rate) at
which >= 99% of requests meet both SLOs, for Sarathi + round robin, Sarathi + least
requests, FairBatching + least requests and FairBatching + PAB (the FairBatching load
estimate), plus Sarathi with its default 512-token chunk + round robin. SLOs follow
the evaluation protocol (fbjax/sim/protocol.py). Paper: +54.3% cluster capacity for
FairBatching with its router over the baseline.

    python scripts/bench_cluster.py --instances 4,8 --duration_s 120
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax.profiling.store import load_profile  # noqa: E402
from fbjax.routing.dispatch import DEFAULT_MAX_HOLD_S, DEFAULT_POLL_INTERVAL_S  # noqa: E402
from fbjax.sched.fairbatching import FairBatchingConfig  # noqa: E402
from fbjax.sim.cluster import cluster_capacity, simulate_cluster  # noqa: E402
from fbjax.sim.instance import PolicySpec  # noqa: E402
from fbjax.sim.protocol import protocol_trace, setting_for  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("traces", ["azure_llm_2023_code", "azure_llm_2023_conv",
                             "mooncake_fast25_conversation"], "Traces to replay.")
flags.DEFINE_string("profile", "a100-llama3-8b", "GPU latency profile.")
flags.DEFINE_list("instances", ["4", "8"], "Cluster sizes.")
flags.DEFINE_float("duration_s", 120.0, "Seconds of each trace (from its start); the "
                   "cluster replays it at rate scale x its own rate.")
flags.DEFINE_string("setting", "strict", "SLO setting of the protocol (fbjax/sim/protocol.py).")
flags.DEFINE_float("tol", 0.04, "Relative tolerance of the capacity bisection.")
flags.DEFINE_float("max_hold_s", DEFAULT_MAX_HOLD_S, "Router hold limit (pab).")
flags.DEFINE_float("poll_interval_s", DEFAULT_POLL_INTERVAL_S, "Router load-poll interval.")
flags.DEFINE_string("json", None, "Write all figures here.")

COMBOS = (("sarathi", "round_robin"), ("sarathi", "least_requests"),
          ("sarathi-512", "round_robin"), ("fairbatching", "least_requests"),
          ("fairbatching", "pab"))


def main(argv):
    del argv
    profile = load_profile(FLAGS.profile)
    router = {"max_hold_s": FLAGS.max_hold_s, "poll_interval_s": FLAGS.poll_interval_s}
    report = {"profile": profile.name, "duration_s": FLAGS.duration_s, "runs": []}
    for trace_name in FLAGS.traces:
        trace = protocol_trace(trace_name, FLAGS.duration_s)
        setting = setting_for(FLAGS.setting, profile, trace)
        slo = setting.slo
        # Sarathi as deployed (largest budget meeting TPOT at p90 context) and at its
        # default chunk of 512, which trades TPOT for TTFT on prompt-heavy traces.
        specs = {"sarathi": PolicySpec("sarathi", token_budget=setting.deployed_budget),
                 "sarathi-512": PolicySpec("sarathi", token_budget=512),
                 "fairbatching": PolicySpec("fairbatching", fairbatching=FairBatchingConfig(
                     ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s))}
        print(f"\n== {trace_name} ({len(trace)} req, {trace.mean_rate:.2f} req/s), "
              f"{setting.describe()}", flush=True)
        for n in (int(x) for x in FLAGS.instances):
            caps = {}
            for policy, routing in COMBOS:
                start = time.perf_counter()
                found = cluster_capacity(trace, specs[policy], routing, n, profile, slo,
                                         tol=FLAGS.tol, lo=0.05 * n, hi=1.0 * n, **router)
                caps[f"{policy}+{routing}"] = found.rate_scale
                points = " ".join(f"{x:.2f}:{a:.3f}" for x, a in found.points)
                print(f"  {n} instances  {policy}+{routing:15s} capacity "
                      f"{found.rate_scale:.3f}  ({time.perf_counter() - start:.0f} s; "
                      f"scale:attainment {points})", flush=True)
            base = caps["sarathi+round_robin"]
            at = base or 0.05 * n
            rows = []
            for policy, routing in COMBOS:
                combo = f"{policy}+{routing}"
                o = simulate_cluster(trace, specs[policy], routing, n, profile, slo,
                                     rate_scale=at, **router)
                s = o.summary
                rows.append({"combo": combo, "capacity": caps[combo],
                             "gain_vs_sarathi_rr": caps[combo] / base - 1 if base else None,
                             "p99_ttft_ms": s.ttft.p(99), "slo_attainment": s.slo_attainment,
                             "held": o.result.num_held,
                             "per_instance": o.result.requests_per_instance()})
            print(f"\n  {n} instances, at Sarathi+round_robin capacity (rate scale {at:.3f})")
            print("  | combo | capacity | gain vs Sarathi+RR | P99 TTFT ms | SLO attain "
                  "| held | requests per instance |")
            print("  |---|---:|---:|---:|---:|---:|---|")
            for r in rows:
                gain = "n/a" if r["gain_vs_sarathi_rr"] is None else \
                    f"{r['gain_vs_sarathi_rr']:+.1%}"
                print(f"  | {r['combo']} | {r['capacity']:.3f} | {gain} | "
                      f"{r['p99_ttft_ms']:.0f} | {r['slo_attainment']:.3f} | {r['held']} | "
                      f"{r['per_instance']} |", flush=True)
            report["runs"].append({"trace": trace_name, "instances": n,
                                   "setting": FLAGS.setting, "rate_scale_compared": at,
                                   "rows": rows})
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
