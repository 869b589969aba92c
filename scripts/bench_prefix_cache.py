"""Prefix caching: what it buys Sarathi-Serve and FairBatching, in the simulator and on
the real engine, measured side by side with and without it.

1. **Simulator**, mooncake_fast25_conversation (its ``hash_ids`` give each prompt's
   shared blocks) on a GPU profile, the protocol's SLO setting: capacity (highest rate
   scale with >= 99% of requests meeting both SLOs), and P50/P99 TTFT plus hit rate at
   the policy's own capacity without caching, for Sarathi as deployed, Sarathi with a
   512-token budget and FairBatching, each with and without the cache. The
   unbounded-cache reuse of the slice (``traces.prefix_reuse``) is printed as the
   ceiling.
2. **Engine**, the built-in model on this CPU: a shared-prefix workload (every prompt
   starts with the same ``--system_tokens``-token system prompt, then a short question
   of its own), arriving at ``--engine_rate`` requests/s; TTFT with and without the
   cache for both policies, each configuration run ``--repeats`` times interleaved.

    python scripts/bench_prefix_cache.py [--duration_s 600] [--profile a100-llama3-8b]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax.profiling.store import load_profile  # noqa: E402
from fbjax.sched.fairbatching import FairBatchingConfig  # noqa: E402
from fbjax.sim.experiment import SLO, capacity, simulate  # noqa: E402
from fbjax.sim.instance import PolicySpec  # noqa: E402
from fbjax.sim.protocol import protocol_trace, setting_for  # noqa: E402
from fbjax.traces import Trace, TraceRequest, prefix_reuse  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("trace", "mooncake_fast25_conversation", "Trace with block hashes.")
flags.DEFINE_string("profile", "a100-llama3-8b", "GPU latency profile (simulator).")
flags.DEFINE_float("duration_s", 600.0, "Seconds of the trace to replay (from its start).")
flags.DEFINE_string("setting", "strict", "SLO setting of the protocol (fbjax/sim/protocol.py).")
flags.DEFINE_float("tol", 0.03, "Relative tolerance of the capacity bisection.")
flags.DEFINE_bool("engine", True, "Also run the shared-prefix workload on the engine.")
flags.DEFINE_integer("requests", 48, "Engine: requests in the shared-prefix workload.")
flags.DEFINE_integer("system_tokens", 1024, "Engine: tokens of the shared system prompt.")
flags.DEFINE_integer("question_tokens", 48, "Engine: tokens of each request's own part.")
flags.DEFINE_integer("output_tokens", 16, "Engine: tokens generated per request.")
flags.DEFINE_float("engine_rate", 4.0, "Engine: arrivals per second (evenly spaced).")
flags.DEFINE_integer("repeats", 2, "Engine: runs of each configuration, interleaved.")
flags.DEFINE_string("json", None, "Write all figures here.")


def simulator_part() -> dict:
    profile = load_profile(FLAGS.profile)
    trace = protocol_trace(FLAGS.trace, FLAGS.duration_s)
    setting = setting_for(FLAGS.setting, profile, trace)
    slo = setting.slo
    fb = FairBatchingConfig(ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s)
    pairs = []  # (without, with) the cache
    for budget in sorted({setting.deployed_budget, 512}):
        label = (f"sarathi-deployed({budget})" if budget == setting.deployed_budget
                 else f"sarathi-{budget}")
        pairs.append(tuple(PolicySpec("sarathi", token_budget=budget, label=label,
                                      prefix_caching=c) for c in (False, True)))
    pairs.append(tuple(PolicySpec("fairbatching", fairbatching=fb, prefix_caching=c)
                       for c in (False, True)))
    print(f"simulator: {trace.name}, {len(trace)} requests over {trace.duration_s:.0f} s, "
          f"profile {profile.name} (KV pool {profile.kv_capacity_tokens:,} tokens); "
          f"{setting.describe()}")
    ceiling = prefix_reuse(trace, profile.page_size)
    print(f"prefix reuse with an unbounded cache (from hash_ids): {ceiling:.3f} of prompt "
          "tokens")
    capacities = {}
    for spec in (spec for pair in pairs for spec in pair):
        with tqdm(desc=f"capacity {spec.name}", unit="run", file=sys.stderr) as bar:
            result = capacity(trace, spec, profile, slo, tol=FLAGS.tol, lo=0.05, hi=1.0,
                              on_point=lambda s, a, bar=bar: bar.update(1))
        capacities[spec.name] = result.rate_scale
    out = {"trace": trace.name, "num_requests": len(trace), "profile": profile.name,
           "setting": setting.describe(), "unbounded_reuse": ceiling, "rows": {}}
    print("\neach pair at its no-cache capacity (0.05 if below the search range):")
    print("| policy | capacity (rate scale) | compared at | P50 TTFT ms | P99 TTFT ms "
          "| SLO attain | TPOT attain | prefix hit rate |")
    print("|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        rate = capacities[pair[0].name] or 0.05
        for spec in pair:
            o = simulate(trace, spec, profile, slo, rate_scale=rate)
            s = o.summary
            hit = o.prefix_cache_hit_rate
            print(f"| {spec.name} | {capacities[spec.name]:.3f} | {rate:.3f} "
                  f"| {s.ttft.p(50):.0f} | {s.ttft.p(99):.0f} | {s.slo_attainment:.3f} "
                  f"| {s.tpot_attainment:.3f} | {'-' if hit is None else f'{hit:.3f}'} |")
            out["rows"][spec.name] = {
                "capacity_rate_scale": capacities[spec.name], "compared_at": rate,
                "ttft_p50_ms": s.ttft.p(50), "ttft_p99_ms": s.ttft.p(99),
                "slo_attainment": s.slo_attainment, "tpot_attainment": s.tpot_attainment,
                "prefix_cache_hit_rate": hit}
    for off, on in pairs:
        gain = (f"x{capacities[on.name] / capacities[off.name]:.2f}"
                if capacities[off.name] else "from 0")
        p99 = out["rows"][off.name]["ttft_p99_ms"] / out["rows"][on.name]["ttft_p99_ms"]
        print(f"{off.name}: capacity {gain} with caching; P99 TTFT x{p99:.2f} lower at "
              "the same load")
    return out


def shared_prefix_trace() -> Trace:
    """Every prompt: the system prompt's blocks (shared ids), then its own block."""
    block = FLAGS.system_tokens
    reqs = [TraceRequest(i / FLAGS.engine_rate, FLAGS.system_tokens + FLAGS.question_tokens,
                         FLAGS.output_tokens, hash_ids=(0, 1 + i)) for i in range(FLAGS.requests)]
    return Trace("shared-prefix", reqs, hash_block_size=block)


def engine_part() -> dict:
    from fbjax.replay.engine import build_engine, replay_engine, scheduler_config

    trace = shared_prefix_trace()
    slo = SLO(3.0, 0.1)
    engines = {caching: build_engine("fairbatching", prefix_caching=caching)
               for caching in (False, True)}
    configs = {p: scheduler_config(engines[False], p, slo) for p in ("sarathi",
                                                                   "fairbatching")}
    import jax

    print(f"\nengine: {FLAGS.requests} requests, {FLAGS.system_tokens}-token shared system "
          f"prompt + {FLAGS.question_tokens} own tokens, {FLAGS.output_tokens} output tokens, "
          f"{FLAGS.engine_rate:g} req/s; built-in model on {jax.devices()[0].device_kind}")
    results: dict[str, list] = {}
    for repeat in range(FLAGS.repeats):
        for policy, config in configs.items():
            for caching, engine in engines.items():
                engine.use_scheduler(config)  # also empties the prefix cache
                start = time.perf_counter()
                o = replay_engine(engine, trace, slo, policy=policy, seed=repeat)
                name = f"{policy}{'+prefix-cache' if caching else ''}"
                results.setdefault(name, []).append(o)
                print(f"  run {repeat + 1} {name}: P50 TTFT {o.summary.ttft.p(50):.0f} ms, "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("| configuration | P50 TTFT ms | P99 TTFT ms | mean TTFT ms | prefix hit rate |")
    print("|---|---|---|---|---|")
    out = {}
    for name, outcomes in results.items():
        p50 = statistics.mean(o.summary.ttft.p(50) for o in outcomes)
        p99 = statistics.mean(o.summary.ttft.p(99) for o in outcomes)
        mean = statistics.mean(o.summary.ttft.mean_ms for o in outcomes)
        hit = outcomes[0].prefix_cache_hit_rate
        print(f"| {name} | {p50:.0f} | {p99:.0f} | {mean:.0f} "
              f"| {'-' if hit is None else f'{hit:.3f}'} |")
        out[name] = {"ttft_p50_ms": p50, "ttft_p99_ms": p99, "ttft_mean_ms": mean,
                     "prefix_cache_hit_rate": hit}
    for policy in configs:
        off, on = out[policy], out[f"{policy}+prefix-cache"]
        print(f"{policy}: mean TTFT x{off['ttft_mean_ms'] / on['ttft_mean_ms']:.2f} lower, "
              f"P99 x{off['ttft_p99_ms'] / on['ttft_p99_ms']:.2f} lower with caching")
    return out


def main(argv: list[str]) -> int:
    del argv
    figures = {"simulator": simulator_part()}
    if FLAGS.engine:
        figures["engine"] = engine_part()
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(figures, indent=1, default=float) + "\n")
        print(f"figures written to {FLAGS.json}")
    return 0


if __name__ == "__main__":
    app.run(main)
