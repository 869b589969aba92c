"""FairBatching vs Sarathi-Serve vs vLLM-style chunked prefill in the simulator.

Follows the evaluation protocol (docs/architecture.md, fbjax/sim/protocol.py): for each
trace and SLO setting (one TTFT SLO for all, prompt-proportional, token-stall; strict or
relaxed multiples of the profile's unloaded latencies), it finds each policy's capacity
(highest rate scale with >= 99% of requests meeting their SLOs, by bisection), then
compares everyone at the **Sarathi oracle's** capacity: P50/P99 TTFT, P99 time between
tokens, TPOT attainment in the vLLM view and in the envelope view, the longest stall.
Baselines: the Sarathi oracle (best capacity over ``--oracle_budgets``, by default
``protocol.ORACLE_BUDGETS``, 128 to 4096), Sarathi with deadline-ordered admission at
the oracle's budget (EDF's share of the gain), vLLM with its own defaults for the
profile's device (``protocol.vllm_defaults``), and Sarathi as deployed (largest bucket
whose worst-case step meets the TPOT SLO) as a labelled extra row. Ablations: the
FairBatching rows of ``protocol.policy_specs``. ``<trace>@gamma<shape>`` replays a
trace's requests under Gamma arrivals of that shape.

    python scripts/bench_schedulers.py --traces azure_llm_2023_conv --duration_s 300
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax.profiling.store import load_profile  # noqa: E402
from fbjax.sim.experiment import capacity, simulate  # noqa: E402
from fbjax.sim.instance import PolicySpec  # noqa: E402
from fbjax.sim.protocol import (  # noqa: E402
    IDEAL_ORDERS,
    ORACLE_BUDGETS,
    SLO_SETTINGS,
    Setting,
    ideal_capacity,
    ideal_ttft_percentile,
    policy_specs,
    protocol_trace,
    sarathi_edf_spec,
    setting_for,
    unloaded_ttft_floor,
    vllm_label,
)

FLAGS = flags.FLAGS
flags.DEFINE_list("traces", ["azure_llm_2023_code", "azure_llm_2023_conv",
                             "mooncake_fast25_conversation"], "Traces to replay.")
flags.DEFINE_string("profile", "a100-llama3-8b", "GPU latency profile.")
flags.DEFINE_float("duration_s", 600.0, "Seconds of each trace to replay (from its start).")
flags.DEFINE_list("settings", ["uniform-strict", "strict", "stall-strict"],
                  f"SLO settings to run, of {list(SLO_SETTINGS)} (fbjax/sim/protocol.py).")
flags.DEFINE_bool("ablations", True, "Also run the FairBatching ablations.")
flags.DEFINE_float("tol", 0.03, "Relative tolerance of the capacity bisection.")
flags.DEFINE_string("json", None, "Write all figures here.")
flags.DEFINE_list("stall_caps", [], "Also run FairBatching with max_decode_stall_tpots set "
                  "to each of these multiples of the TPOT SLO (rows fb-stall-<k>x).")
flags.DEFINE_list("only", [], "Run only these rows (plus sarathi-deployed and fairbatching, "
                  "which the comparison needs), e.g. fb-no-fair-formation,fb-stall-2x.")
flags.DEFINE_list("oracle_budgets", [str(b) for b in ORACLE_BUDGETS],
                  "Sarathi budgets the oracle is the best of (a narrower ladder for long "
                  "runs; the output names it).")

def specs(setting: Setting) -> list[PolicySpec]:
    """The protocol's rows, plus the stall-cap variants asked for, filtered by --only."""
    out = policy_specs(setting, ablations=FLAGS.ablations,
                       oracle_budgets=tuple(int(b) for b in FLAGS.oracle_budgets))
    fb = next(spec for spec in out if spec.name == "fairbatching").fairbatching
    for k in FLAGS.stall_caps:
        out.append(PolicySpec("fairbatching", label=f"fb-stall-{k}x",
                              fairbatching=dataclasses.replace(
                                  fb, max_decode_stall_tpots=float(k))))
    if FLAGS.only:
        keep = set(FLAGS.only) | {out[0].name, "fairbatching"}
        out = [spec for spec in out if spec.name in keep]
    return out


def main(argv):
    del argv
    profile = load_profile(FLAGS.profile)
    report = {"profile": profile.name, "duration_s": FLAGS.duration_s, "runs": []}
    for trace_name in FLAGS.traces:
        trace = protocol_trace(trace_name, FLAGS.duration_s)
        for setting_name in FLAGS.settings:
            setting = setting_for(setting_name, profile, trace)
            slo, deployed = setting.slo, setting.deployed_budget
            print(f"\n== {trace_name} ({len(trace)} req, {trace.mean_rate:.2f} req/s), "
                  f"{setting.describe()}", flush=True)
            caps = {}
            for spec in specs(setting):
                start = time.perf_counter()
                caps[spec.name] = capacity(trace, spec, profile, slo, tol=FLAGS.tol,
                                           lo=0.05, hi=1.0).rate_scale
                print(f"  capacity {spec.name:28s} {caps[spec.name]:.3f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            oracle_spec = max((s for s in specs(setting) if s.policy == "sarathi"),
                              key=lambda s: caps[s.name])
            oracle = oracle_spec.name
            edf = sarathi_edf_spec(setting, oracle_spec.token_budget)
            start = time.perf_counter()
            caps[edf.name] = capacity(trace, edf, profile, slo, tol=FLAGS.tol, lo=0.05,
                                      hi=1.0).rate_scale
            print(f"  capacity {edf.name:28s} {caps[edf.name]:.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            ref_name = f"sarathi-deployed({deployed})"
            # Latencies are compared at the oracle's capacity (the baseline of every
            # headline), deployed's is an extra row.
            at = caps[oracle] or 0.05
            rows = []
            for spec in [*specs(setting), edf]:
                o = simulate(trace, spec, profile, slo, rate_scale=at)
                s = o.summary
                rows.append({"policy": spec.name, "capacity": caps[spec.name],
                             "p50_ttft_ms": s.ttft.p(50), "p99_ttft_ms": s.ttft.p(99),
                             "tpot_attainment": s.tpot_attainment,
                             "envelope_attainment": s.envelope_attainment,
                             "slo_attainment": s.slo_attainment,
                             "p99_tbt_ms": s.itl.p(99), "max_stall_ms": s.max_tbt_stall_ms})
            base = next(r for r in rows if r["policy"] == oracle)
            fb = next(r for r in rows if r["policy"] == "fairbatching")
            print(f"\n  at the oracle's capacity (rate scale {at:.3f}); oracle = {oracle} "
                  f"(best of {', '.join(FLAGS.oracle_budgets)} and deployed)")
            print("  | policy | capacity | P50 TTFT ms | P99 TTFT ms | P99 TBT ms "
                  "| TPOT attain (vLLM) | envelope attain | SLO attain | max stall ms |")
            print("  |---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"  | {r['policy']} | {r['capacity']:.3f} | {r['p50_ttft_ms']:.0f} "
                      f"| {r['p99_ttft_ms']:.0f} | {r['p99_tbt_ms']:.0f} "
                      f"| {r['tpot_attainment']:.3f} "
                      f"| {r['envelope_attainment']:.3f} | {r['slo_attainment']:.3f} "
                      f"| {r['max_stall_ms']:.0f} |")
            def gain(a: float, b: float) -> str:
                return f"{a / b - 1:+.1%}" if b else "n/a (baseline capacity 0)"

            fb_cap = caps["fairbatching"]
            vllm = caps.get(vllm_label(setting))
            floor_ms = unloaded_ttft_floor(profile, trace) * 1e3
            print(f"  P99 TTFT floor (every request alone): {floor_ms:.0f} ms, so no policy "
                  f"can cut the oracle's P99 by more than "
                  f"{base['p99_ttft_ms'] / floor_ms:.2f}x here")
            # The idealized instance of protocol.ideal_ttfts: best per-token prefill cost,
            # perfect packing, free decodes, preemption at will.
            ideal_p99_s, ideal_order = ideal_ttft_percentile(profile, trace, slo, at)
            ideal = ideal_capacity(profile, trace, slo)
            print(f"  an ideal instance (best per-token prefill cost, perfect packing, free "
                  f"decodes, preemptive) at this rate: P99 TTFT {ideal_p99_s * 1e3:.0f} ms "
                  f"({ideal_order}, the best of {', '.join(IDEAL_ORDERS)}), the oracle's "
                  f"is {base['p99_ttft_ms'] / (ideal_p99_s * 1e3):.2f}x that; its "
                  f"capacity (EDF) is {ideal:.3f}: FairBatching reaches {fb_cap / ideal:.0%} "
                  f"of it, the oracle {caps[oracle] / ideal:.0%}")
            print(f"  FairBatching: P99 TTFT {base['p99_ttft_ms'] / fb['p99_ttft_ms']:.2f}x "
                  f"lower than the oracle ({oracle}), P99 TBT {base['p99_tbt_ms']:.0f} -> "
                  f"{fb['p99_tbt_ms']:.0f} ms; capacity {gain(fb_cap, caps[oracle])} vs "
                  f"oracle, {gain(fb_cap, caps[edf.name])} vs {edf.name}"
                  + (f", {gain(fb_cap, vllm)} vs vLLM default" if vllm is not None else "")
                  + f" ({gain(fb_cap, caps[ref_name])} vs Sarathi as deployed, an extra row)",
                  flush=True)
            report["runs"].append({"trace": trace_name, "setting": setting_name,
                                   "slo": dataclasses.asdict(slo), "deployed": deployed,
                                   "oracle": oracle, "rate_scale_compared": at,
                                   "p99_ttft_floor_ms": floor_ms, "ideal_capacity": ideal,
                                   "ideal_p99_ttft_ms": ideal_p99_s * 1e3,
                                   "rows": rows})
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
