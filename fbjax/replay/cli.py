"""Trace replay through the simulator or, with ``--engine``, through the real engine.

``python -m fbjax.replay --trace azure_llm_2023_conv``

Replays a request trace (a name in ``<shared>/data/traces`` or a path) through one or
more schedulers on a latency profile (a name or a path; ``fbjax.profiling.store``), and
prints, per policy, a results block like vLLM's serving benchmark plus a side-by-side
table. ``--capacity``
adds the highest rate scale meeting the SLO for 99% of requests (bisection);
``--plot`` draws TTFT and TPOT CDFs; ``--json`` writes every figure.

    python -m fbjax.replay --trace azure_llm_2023_conv --duration_s 300 \\
        --profile a100-llama3-8b --scheduler sarathi,fairbatching \\
        --slo_ttft_ms 3000 --slo_tpot_ms 100 --plot cdf.png

With ``--engine`` the trace slice runs on the real engine (the built-in model unless
``--model``; real tokens, wall-clock time; see ``fbjax.replay.engine``), policies one
after another on one compiled engine, with the same report. The profile is then the
engine's (default ``<device>-<model>.json`` among the known profiles); prompt and output lengths
are scaled to the model's context (``--length_scale``), and the report says by how much.

    python -m fbjax.replay --engine --trace azure_llm_2023_conv --duration_s 60 \
        --scheduler sarathi,fairbatching --slo_ttft_ms 1000 --slo_tpot_ms 50
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags
from tqdm import tqdm

from fbjax.metrics import format_table
from fbjax.profiling.store import load_profile
from fbjax.sched.fairbatching import ANCHORS, FairBatchingConfig
from fbjax.sim.experiment import SLO, Outcome, capacity, simulate
from fbjax.sim.instance import PolicySpec, deployed_chunk_size
from fbjax.traces import TraceError, load_trace

FLAGS = flags.FLAGS
flags.DEFINE_string("trace", None, "Trace name (in <shared>/data/traces) or path.")
flags.DEFINE_list("scheduler", ["sarathi", "fairbatching"],
                  "Policies to compare: vllm, sarathi, fairbatching (comma-separated).")
flags.DEFINE_string("profile", "a100-llama3-8b", "Latency profile name or path.")
flags.DEFINE_float("rate_scale", 1.0, "Multiply the trace's arrival rate by this.")
flags.DEFINE_float("slo_ttft_ms", 3000.0, "TTFT SLO in ms.")
flags.DEFINE_float("slo_tpot_ms", 100.0, "TPOT SLO in ms.")
flags.DEFINE_float("slo_ttft_prefill_multiple", None, "If set, a request's TTFT SLO is at "
                   "least this multiple of its own unloaded prefill time (long prompts).")
flags.DEFINE_float("start_s", 0.0, "Replay the trace from this time (seconds).")
flags.DEFINE_float("duration_s", None, "Replay only this many seconds of the trace.")
flags.DEFINE_float("jitter_s", 0.0, "Spread quantized arrivals (Mooncake) uniformly over this.")
flags.DEFINE_string("sarathi_budget", "deployed", "Sarathi/vLLM token budget: an integer, or "
                    "'deployed' (largest bucket whose worst-case step meets the TPOT SLO).")
flags.DEFINE_enum("anchor", "first_token", list(ANCHORS), "FairBatching envelope anchor.")
flags.DEFINE_float("max_decode_stall_ms", None, "FairBatching: cap on skipped-decode stalls.")
flags.DEFINE_float("noise", 0.0, "Multiplicative step-time noise (std of a N(1, noise)).")
flags.DEFINE_integer("seed", 0, "Seed for noise and jitter.")
flags.DEFINE_bool("prefix_caching", False, "Reuse cached prompt prefixes (simulator: "
                  "from the trace's block hashes, Mooncake hash_ids; --engine: the tokens, "
                  "built to share those blocks); the report adds the hit rate. Off by "
                  "default, as in the paper's protocol.")
flags.DEFINE_bool("capacity", False, "Also search each policy's capacity (99% attainment).")
flags.DEFINE_string("plot", None, "Write TTFT/TPOT CDF plots to this PNG.")
flags.DEFINE_string("json", None, "Write all figures to this JSON file.")
flags.DEFINE_bool("engine", False, "Replay through the real engine instead of the simulator.")
flags.DEFINE_string("model", None, "--engine: local HF model directory (default: built-in).")
flags.DEFINE_string("length_scale", "auto", "--engine: multiply prompt and output lengths by "
                    "this, or 'auto' (the largest factor that fits the p99 request in the "
                    "model's context).")
flags.DEFINE_integer("num_pages", 1024, "--engine: KV cache pages (16 tokens each).")
flags.DEFINE_list("token_buckets", None, "--engine: token-budget ladder (default: "
                  "EngineConfig's; the profile must cover every bucket).")
flags.DEFINE_list("seq_buckets", None, "--engine: sequences-per-step ladder.")
flags.DEFINE_bool("force_profile", False, "--engine: use a profile of another device/model.")
flags.DEFINE_string("save_profile", None, "--engine: write the online-refined profile here.")
flags.mark_flag_as_required("trace")


def policy_specs(names: list[str], budget: int, anchor: str,
                 stall_s: float | None, slo: SLO, prefix_caching: bool = False
                 ) -> list[PolicySpec]:
    specs = []
    for name in names:
        if name in ("sarathi", "vllm"):
            specs.append(PolicySpec(name, token_budget=budget, prefix_caching=prefix_caching))
        elif name == "fairbatching":
            specs.append(PolicySpec(name, fairbatching=FairBatchingConfig(
                ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s, anchor=anchor,
                max_decode_stall_s=stall_s), prefix_caching=prefix_caching))
        else:
            raise ValueError(f"--scheduler: unknown policy {name!r} "
                             "(choose vllm, sarathi, fairbatching)")
    return specs


def comparison_table(outcomes: list[Outcome], capacities: dict[str, float]) -> str:
    hits = any(o.prefix_cache_hit_rate is not None for o in outcomes)
    head = ("| policy | P50 TTFT ms | P99 TTFT ms | P50 TPOT ms | P99 TPOT ms | SLO attain "
            "| TPOT attain | envelope attain | prefill share | max stall ms |"
            + (" prefix hit rate |" if hits else "")
            + (" capacity (rate scale) |" if capacities else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in outcomes:
        s = o.summary
        row = (f"| {o.policy} | {s.ttft.p(50):.0f} | {s.ttft.p(99):.0f} | {s.tpot.p(50):.1f} "
               f"| {s.tpot.p(99):.1f} | {s.slo_attainment:.3f} | {s.tpot_attainment:.3f} "
               f"| {s.envelope_attainment:.3f} | {o.share.prefill_share:.2f} "
               f"| {s.max_tbt_stall_ms:.0f} |")
        if hits:
            rate = o.prefix_cache_hit_rate
            row += " - |" if rate is None else f" {rate:.3f} |"
        if capacities:
            row += f" {capacities.get(o.policy, float('nan')):.3f} |"
        lines.append(row)
    return "\n".join(lines)


def plot_cdfs(outcomes: list[Outcome], slo: SLO, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for o in outcomes:
        for ax, values in ((axes[0], [r.ttft for r in o.records if r.ttft is not None]),
                           (axes[1], [r.tpot for r in o.records if r.tpot is not None])):
            x = np.sort(np.asarray(values) * 1e3)
            ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), label=o.policy)
    for ax, name, limit in ((axes[0], "TTFT", slo.ttft_s), (axes[1], "TPOT", slo.tpot_s)):
        ax.axvline(limit * 1e3, color="grey", linestyle="--", label=f"SLO {limit * 1e3:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def engine_main(trace) -> int:
    """``--engine``: the slice through the real engine, each policy in turn."""
    from fbjax.profiling.store import ProfileError
    from fbjax.replay.engine import (
        build_engine,
        engine_profile,
        fit_lengths,
        scheduler_config,
        step_time_summary,
    )

    if FLAGS.capacity:
        raise ValueError("--capacity needs the simulator (it replays at many rates); "
                         "drop --engine or --capacity")
    profile_arg = FLAGS.profile if FLAGS["profile"].present else None
    slo = SLO(FLAGS.slo_ttft_ms / 1e3, FLAGS.slo_tpot_ms / 1e3, FLAGS.slo_ttft_prefill_multiple)
    for name in FLAGS.scheduler:
        if name not in ("vllm", "sarathi", "fairbatching"):
            raise ValueError(f"--scheduler: unknown policy {name!r} "
                             "(choose vllm, sarathi, fairbatching)")
    try:
        scale = None if FLAGS.length_scale == "auto" else float(FLAGS.length_scale)
    except ValueError:
        raise ValueError("--length_scale must be a number in (0, 1] or 'auto', got "
                         f"{FLAGS.length_scale!r}") from None
    from fbjax.config import BucketConfig

    default = BucketConfig()
    try:
        buckets = BucketConfig(
            tuple(int(x) for x in FLAGS.token_buckets or default.token_buckets),
            tuple(int(x) for x in FLAGS.seq_buckets or default.seq_buckets))
    except ValueError as e:
        raise ValueError(f"--token_buckets/--seq_buckets: {e}") from None
    try:
        engine = build_engine("fairbatching", model=FLAGS.model, profile=profile_arg,
                              buckets=buckets,
                              force_profile=FLAGS.force_profile, slo=slo,
                              anchor=FLAGS.anchor, num_pages=FLAGS.num_pages,
                              prefix_caching=FLAGS.prefix_caching)
    except ProfileError as e:
        raise ValueError(str(e)) from None
    trace = trace.scaled(FLAGS.rate_scale) if FLAGS.rate_scale != 1.0 else trace
    trace, scaling = fit_lengths(trace, engine.max_model_len, scale)
    profile = engine_profile(engine)
    if FLAGS.sarathi_budget == "deployed":
        context = int(sorted(r.prompt_len for r in trace)[int(0.9 * (len(trace) - 1))])
        budget = deployed_chunk_size(profile.latency, profile.buckets, slo.tpot_s, context)
    else:
        budget = int(FLAGS.sarathi_budget)
    print(f"trace {trace.name}: {len(trace)} requests over {trace.duration_s:.0f} s "
          f"({trace.mean_rate:.2f} req/s, rate scale {FLAGS.rate_scale} applied) on the real "
          f"engine ({engine.model_config.name}, {engine.profile_path.stem} profile); "
          f"{scaling.describe()}; SLO {slo.describe()}; Sarathi/vLLM budget {budget} tokens")
    outcomes = []
    from fbjax.replay.engine import replay_engine

    for name in FLAGS.scheduler:
        engine.use_scheduler(scheduler_config(engine, name, slo, token_budget=budget,
                                              anchor=FLAGS.anchor))
        with tqdm(total=len(trace), desc=f"engine {name}", unit="req", file=sys.stderr) as bar:
            outcome = replay_engine(engine, trace, slo, engine_profile(engine), policy=name,
                                    seed=FLAGS.seed, envelope_anchor=FLAGS.anchor,
                                    on_progress=lambda d, t, bar=bar: bar.update(d - bar.n))
        outcomes.append(outcome)
        steps = step_time_summary(outcome.result.steps)
        print(f"\n{name} (real engine: {steps['steps']:.0f} steps, step time p50 "
              f"{steps['p50_ms']:.1f} ms, p99 {steps['p99_ms']:.1f} ms"
              + (f"; {outcome.num_skipped} requests refused" if outcome.num_skipped else "")
              + ")")
        print(format_table(outcome.summary))
        if FLAGS.save_profile and engine.latency is not None:
            engine.save_profile(FLAGS.save_profile)
            print(f"online-refined profile written to {FLAGS.save_profile}")
    print(f"\nlength scaling: {scaling.describe()}")
    print(comparison_table(outcomes, {}))
    if FLAGS.plot:
        plot_cdfs(outcomes, slo, FLAGS.plot, f"{trace.name} on the engine: {slo.describe()}")
        print(f"plot written to {FLAGS.plot}")
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps({
            "trace": trace.name, "num_requests": len(trace), "rate_scale": FLAGS.rate_scale,
            "executor": "engine", "profile": str(engine.profile_path),
            "length_scaling": {"factor": scaling.factor, "context": scaling.context,
                               "clipped": scaling.num_clipped,
                               "description": scaling.describe()},
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "sarathi_budget": budget,
            "results": {o.policy: {**o.summary.to_dict(), "prefill_share": o.share.prefill_share,
                                   "skipped": o.num_skipped,
                                   "prefix_cache_hit_rate": o.prefix_cache_hit_rate,
                                   "steps": step_time_summary(o.result.steps)}
                        for o in outcomes},
        }, indent=1) + "\n")
        print(f"figures written to {FLAGS.json}")
    return 0


def main(argv: list[str]) -> int:
    del argv
    try:
        trace = load_trace(FLAGS.trace, **({"jitter_s": FLAGS.jitter_s}
                                           if FLAGS.jitter_s else {}))
        end = None if FLAGS.duration_s is None else FLAGS.start_s + FLAGS.duration_s
        if FLAGS.start_s or end is not None:
            trace = trace.sliced(FLAGS.start_s, end)
        if FLAGS.engine:
            return engine_main(trace)
        profile = load_profile(FLAGS.profile)
        slo = SLO(FLAGS.slo_ttft_ms / 1e3, FLAGS.slo_tpot_ms / 1e3,
                  FLAGS.slo_ttft_prefill_multiple)
        if FLAGS.sarathi_budget == "deployed":
            context = int(sorted(r.prompt_len for r in trace)[int(0.9 * (len(trace) - 1))])
            budget = deployed_chunk_size(profile.latency, profile.buckets, slo.tpot_s, context)
        else:
            try:
                budget = int(FLAGS.sarathi_budget)
            except ValueError:
                raise ValueError("--sarathi_budget must be an integer or 'deployed', got "
                                 f"{FLAGS.sarathi_budget!r}") from None
        stall = None if FLAGS.max_decode_stall_ms is None else FLAGS.max_decode_stall_ms / 1e3
        specs = policy_specs(FLAGS.scheduler, budget, FLAGS.anchor, stall, slo,
                             FLAGS.prefix_caching)
    except (TraceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"trace {trace.name}: {len(trace)} requests over {trace.duration_s:.0f} s "
          f"({trace.mean_rate:.2f} req/s) x rate scale {FLAGS.rate_scale}; profile "
          f"{profile.name}; SLO {slo.describe()}; Sarathi/vLLM budget {budget} tokens")
    outcomes, capacities = [], {}
    for spec in specs:
        with tqdm(total=len(trace), desc=f"simulating {spec.name}", unit="req",
                  file=sys.stderr) as bar:
            def progress(done: int, total: int, bar=bar) -> None:
                bar.update(done - bar.n)

            outcome = simulate(trace, spec, profile, slo, rate_scale=FLAGS.rate_scale,
                               noise=FLAGS.noise, seed=FLAGS.seed, on_progress=progress)
        outcomes.append(outcome)
        print(f"\n{spec.name}" + (f" ({outcome.num_skipped} requests larger than the KV "
                                   "pool skipped)" if outcome.num_skipped else ""))
        print(format_table(outcome.summary))
        if FLAGS.capacity:
            with tqdm(desc=f"capacity {spec.name}", unit="run", file=sys.stderr) as bar:
                result = capacity(trace, spec, profile, slo, noise=FLAGS.noise,
                                  seed=FLAGS.seed,
                                  on_point=lambda s, a, bar=bar: bar.update(1))
            capacities[spec.name] = result.rate_scale
    print()
    print(comparison_table(outcomes, capacities))
    if FLAGS.plot:
        plot_cdfs(outcomes, slo, FLAGS.plot,
                  f"{trace.name} x{FLAGS.rate_scale} on {profile.name}: {slo.describe()}")
        print(f"plot written to {FLAGS.plot}")
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps({
            "trace": trace.name, "num_requests": len(trace), "rate_scale": FLAGS.rate_scale,
            "profile": profile.name, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "sarathi_budget": budget,
            "results": {o.policy: {**o.summary.to_dict(), "prefill_share": o.share.prefill_share,
                                   "skipped": o.num_skipped,
                                   "prefix_cache_hit_rate": o.prefix_cache_hit_rate}
                        for o in outcomes},
            "capacity_rate_scale": capacities,
        }, indent=1) + "\n")
        print(f"figures written to {FLAGS.json}")
    return 0

