"""Trace replay through the real engine: real tokens, real time.

``python -m fbjax.replay --engine`` uses this module in place of the simulator. Each
trace request becomes a real request (a seeded random prompt of the trace's length,
greedy, exactly the trace's output length: EOS ignored) added to an ``LLMEngine`` when
the wall clock reaches its arrival; the engine steps whenever it has work and the loop
sleeps until the next arrival when it has none. A request's arrival time is its
scheduled arrival, so a step in flight when it comes counts against its TTFT, as it
would in a server. Metrics, the report and the prefill/decode share are computed
exactly as for a simulated run (``fbjax.sim.experiment``), so the two compare.

**Length scaling.** Trace prompts are often longer than a small model's context (Azure
conv reaches 14K tokens; the built-in model has 2,048). ``fit_lengths`` multiplies every
prompt and output length by one factor (``auto``: the largest that lets the trace's
99th-percentile request fit the context, or 1 if all fit) and clips the few still too
long; the report states the factor and the number clipped. One factor for all keeps
the mix of long and short requests and the ratio of prefill to decode work.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fbjax.metrics import RequestMetrics, prefill_decode_share, summarize
from fbjax.profiling.store import Profile
from fbjax.sched.base import StepPlan
from fbjax.sched.fairbatching import FairBatchingConfig
from fbjax.sched.latency import LatencyModel, StepFeatures
from fbjax.sched.request import SamplingParams
from fbjax.sim.experiment import SLO, Outcome
from fbjax.sim.instance import PolicySpec
from fbjax.sim.simulator import SimResult, StepRecord
from fbjax.traces import Trace, TraceRequest, load_trace


@dataclasses.dataclass(frozen=True)
class LengthScaling:
    factor: float  # every prompt and output length was multiplied by this
    context: int  # the model context the lengths were fitted to
    num_clipped: int  # requests still too long after scaling, clipped to the context

    def describe(self) -> str:
        if self.factor == 1.0 and not self.num_clipped:
            return f"lengths unscaled (all fit the {self.context}-token context)"
        text = (f"prompt and output lengths x{self.factor:.3f} to fit the model's "
                f"{self.context}-token context")
        if self.num_clipped:
            text += f"; {self.num_clipped} longer requests clipped to it"
        return text


def fit_lengths(trace: Trace, context: int, factor: float | None = None,
                quantile: float = 0.99) -> tuple[Trace, LengthScaling]:
    """``trace`` with lengths scaled by ``factor`` (None: automatic, see the module
    docstring) and clipped so that prompt + output < ``context``."""
    if not len(trace):
        return trace, LengthScaling(1.0, context, 0)
    if factor is None:
        totals = trace.prompt_lens + np.maximum(trace.output_lens, 1)
        need = float(np.quantile(totals, quantile))
        factor = min(1.0, (context - 1) / need)
    if not 0 < factor <= 1:
        raise ValueError(f"length scale must be in (0, 1], got {factor}")
    out, clipped = [], 0
    for r in trace:
        prompt = max(1, round(r.prompt_len * factor))
        output = max(1, round(max(r.output_len, 1) * factor))
        if prompt + output >= context:
            clipped += 1
            output = min(output, max(1, (context - 1) // 4))
            prompt = context - 1 - output
        out.append(dataclasses.replace(r, prompt_len=prompt, output_len=output))
    name = trace.name if factor == 1.0 else f"{trace.name}~len x{factor:.3f}"
    block = max(1, round(trace.hash_block_size * factor))  # hash blocks shrink alike
    return Trace(name, out, block), LengthScaling(float(factor), context, clipped)


def engine_profile(engine) -> Profile:
    """The engine's latency profile as the simulator takes it: its buckets and KV pool."""
    if engine.latency is None:
        raise ValueError("the engine has no latency profile (give SchedulerConfig.profile)")
    cache = engine.config.cache
    return Profile(engine.profile_path.stem if engine.profile_path else "engine",
                   engine.latency, engine.config.buckets, cache.num_pages * cache.page_size,
                   cache.page_size)


def sim_policy_spec(config, slo: SLO) -> PolicySpec:
    """The PolicySpec under which the simulator runs what ``config`` runs on the engine."""
    s = config.scheduler
    fb = None
    if s.policy == "fairbatching":
        fb = FairBatchingConfig(ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s, anchor=s.anchor)
    return PolicySpec(s.policy, token_budget=s.max_num_batched_tokens,
                      max_seqs=s.max_num_seqs or config.buckets.max_seqs, fairbatching=fb)


def _prompt(rng: np.random.Generator, length: int, vocab: int,
            hash_ids: tuple[int, ...] = (), block_size: int = 0) -> list[int]:
    """Random tokens; where the trace gives block hashes (Mooncake), each block's tokens
    are drawn from a generator seeded by its position and hash, so requests that share
    a block prefix in the trace share those tokens here (and the prefix cache sees
    the trace's reuse)."""
    lo = 32 if vocab > 160 else 0  # printable bytes for the built-in byte tokenizer
    hi = min(vocab, 127) if vocab > 160 else vocab
    tokens: list[int] = []
    for b, h in enumerate(hash_ids if block_size > 0 else ()):
        if len(tokens) >= length:
            break
        block_rng = np.random.default_rng([b, h])
        tokens.extend(block_rng.integers(lo, hi, size=block_size).tolist())
    tokens = tokens[:length]
    return tokens + rng.integers(lo, hi, size=length - len(tokens)).tolist()


def replay_engine(engine, trace: Trace, slo: SLO, profile: Profile | None = None, *,
                  policy: str | None = None, seed: int = 0, lead_s: float = 0.2,
                  envelope_anchor: str = "first_token", reference=None,
                  stats: dict | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> Outcome:
    """Run ``trace`` through ``engine`` in real time; the same Outcome as ``simulate``.
    Requests that can never fit the engine (context or KV pool) are skipped and counted.
    ``stats`` receives the total runner time of the steps (``measured_s``), their
    predicted total under a ``reference`` LatencyModel if given (``predicted_s``: how
    fast the machine ran during the replay relative to that profile), and the total
    time of the whole ``engine.step`` calls (``step_wall_s``: the runner plus the
    host's scheduling and batch building, which the simulator does not model)."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    requests: list[TraceRequest] = list(trace)
    steps: list[StepRecord] = []
    scheduler = engine.scheduler
    clock_start = [0.0]

    totals = [0.0, 0.0, 0.0]  # runner seconds, their predictions, whole engine steps

    def observe(plan: StepPlan, seconds: float) -> None:
        decodes = sum(1 for c in plan.chunks if c.is_decode)
        totals[0] += seconds
        if reference is not None:
            totals[1] += reference.predict(plan.bucket, StepFeatures.of_chunks(
                (c.num_tokens, c.kv_len, c.is_decode) for c in plan.chunks))
        steps.append(StepRecord(time.monotonic() - clock_start[0] - seconds, seconds,
                                plan.bucket, plan.num_tokens - decodes, decodes,
                                bool(scheduler.waiting) or decodes < len(plan.chunks),
                                decodes > 0, len(plan.preempted)))

    previous_observer = engine.step_observer
    engine.step_observer = observe
    prompts = [_prompt(rng, r.prompt_len, vocab, r.hash_ids, trace.hash_block_size)
               for r in requests]
    ids: list[str] = []
    slos: dict[str, tuple[float, float]] = {}
    skipped = 0
    t0 = time.monotonic() + lead_s
    clock_start[0] = t0
    nxt = finished = 0
    try:
        while nxt < len(requests) or engine.has_unfinished_requests():
            now = time.monotonic()
            while nxt < len(requests) and t0 + requests[nxt].arrival_s <= now:
                r = requests[nxt]
                ttft = slo.ttft_for(r.prompt_len, profile) if profile else slo.ttft_s
                try:
                    rid = engine.add_request(
                        prompts[nxt], SamplingParams(max_tokens=max(1, r.output_len),
                                                     temperature=0.0, ignore_eos=True),
                        request_id=f"trace-{nxt}", arrival_time=t0 + r.arrival_s,
                        ttft_slo=ttft, tpot_slo=slo.tpot_s)
                    ids.append(rid)
                    slos[rid] = (ttft, slo.tpot_s)
                except ValueError:
                    skipped += 1
                nxt += 1
            if engine.has_unfinished_requests():
                step_start = time.perf_counter()
                for out in engine.step():
                    finished += out.finished
                totals[2] += time.perf_counter() - step_start
                if on_progress is not None and finished and len(steps) % 50 == 0:
                    on_progress(finished, len(requests))
            elif nxt < len(requests):
                time.sleep(max(0.0, t0 + requests[nxt].arrival_s - time.monotonic()))
    finally:
        engine.step_observer = previous_observer
    end = time.monotonic()
    if stats is not None:
        stats.update(measured_s=totals[0], predicted_s=totals[1], step_wall_s=totals[2],
                     num_steps=len(steps))
    if on_progress is not None:
        on_progress(finished + skipped, len(requests))
    records = []
    for rid in ids:
        c = engine.pop_finished(rid)
        records.append(RequestMetrics.from_times(
            c.arrival_time - t0, [t - t0 for t in c.token_times], len(c.prompt_token_ids),
            *slos[rid], rid, c.num_preemptions))
    first = min((r.arrival for r in records), default=0.0)
    summary = summarize(records, max(end - t0 - first, 1e-9), ttft_slo=slo.ttft_s,
                        tpot_slo=slo.tpot_s, envelope_anchor=envelope_anchor,
                        tbt_slo=slo.tbt_s)
    share = prefill_decode_share(
        (s.duration, s.prefill_tokens, s.decode_tokens, s.waiting_prefill, s.waiting_decode)
        for s in steps)
    name = policy or engine.config.scheduler.policy
    hit_rate = scheduler.prefix_cache_hit_rate() if engine.kv.enable_prefix_caching else None
    return Outcome(name, 1.0, summary, records, share, SimResult([], steps, end - t0),
                   skipped, hit_rate)


def step_time_summary(steps: list[StepRecord]) -> dict[str, float]:
    durations = np.array([s.duration for s in steps]) if steps else np.zeros(1)
    return {"steps": float(len(steps)), "mean_ms": float(durations.mean() * 1e3),
            "p50_ms": float(np.median(durations) * 1e3),
            "p99_ms": float(np.percentile(durations, 99) * 1e3),
            "busy_s": float(durations.sum())}


def relative_difference(a: float, b: float) -> float:
    """|a - b| / b (nan when b is 0 or either is nan)."""
    if not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return abs(a - b) / abs(b)


def build_engine(policy: str = "vllm", *, model: str | None = None, profile: str | None = None,
                 force_profile: bool = False, token_budget: int | None = None,
                 slo: SLO | None = None, anchor: str = "first_token", num_pages: int = 1024,
                 buckets=None, show_progress: bool = True, prefix_caching: bool = False):
    """An engine for replays: the given policy and profile, default buckets, a pool of
    ``num_pages`` 16-token pages (prefix caching off unless asked: replays compare with
    simulator runs that have it off)."""
    from fbjax.config import BucketConfig, CacheConfig, EngineConfig, SchedulerConfig
    from fbjax.engine.engine import LLMEngine

    slo = slo or SLO(3.0, 0.1)
    sched = SchedulerConfig(policy=policy, max_num_batched_tokens=token_budget,
                            profile=profile, force_profile=force_profile,
                            ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s, anchor=anchor)
    return LLMEngine(EngineConfig(model=model, buckets=buckets or BucketConfig(),
                                  cache=CacheConfig(num_pages=num_pages,
                                                    enable_prefix_caching=prefix_caching),
                                  scheduler=sched,
                                  show_progress=show_progress))


def scheduler_config(engine, policy: str, slo: SLO, *, token_budget: int | None = None,
                     anchor: str = "first_token"):
    """The engine's scheduler config switched to ``policy`` (same profile and flags)."""
    return dataclasses.replace(
        engine.config.scheduler, policy=policy,
        profile=str(engine.profile_path) if engine.profile_path else None,
        max_num_batched_tokens=token_budget if policy != "fairbatching" else None,
        ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s, anchor=anchor)


def calibrate(engine, warm: Trace, slo: SLO, out_dir: str | None = None):
    """Replay ``warm`` on the engine with online refinement on and save the refined
    profile (to a temporary directory unless ``out_dir``); returns its path. Brings a
    profile recorded earlier up to the machine's present state before a comparison,
    and records the engine's host work per step (``host_overhead_s``: scheduling,
    batch building, fetching samples), which the simulator then adds to every step."""
    import tempfile
    from pathlib import Path

    stats: dict = {}
    replay_engine(engine, warm, slo, engine_profile(engine), stats=stats)
    if stats.get("num_steps"):
        engine.latency.metadata["host_overhead_s"] = round(
            (stats["step_wall_s"] - stats["measured_s"]) / stats["num_steps"], 7)
    path = Path(out_dir or tempfile.mkdtemp()) / engine.profile_path.name
    engine.save_profile(path)
    return path


@dataclasses.dataclass
class CalibratedSlice:
    """What the engine benchmarks share: an engine, a trace slice fitted to its context,
    and the engine's profile after online calibration, as a simulator profile."""

    engine: Any
    trace: Trace
    scaling: LengthScaling
    profile_path: Path
    sim_profile: Profile


def calibrated_slice(trace_name: str | Trace, start_s: float, duration_s: float,
                     length_scale: str, calibrate_s: float, slo: SLO,
                     profile: str | None = None, *, engine=None) -> CalibratedSlice:
    """A FairBatching engine and the slice ``[start_s, start_s + duration_s)`` of the
    trace (a name or a Trace); with ``calibrate_s`` > 0 the preceding seconds run on the
    engine first, so online refinement brings the profile to the machine's present
    speed. ``engine``: an idle compiled engine to switch to FairBatching on ``profile``
    (default: a new engine of the built-in model)."""
    if engine is None:
        engine = build_engine("fairbatching", profile=profile, slo=slo)
    else:
        sched = scheduler_config(engine, "fairbatching", slo)
        engine.use_scheduler(sched if profile is None
                             else dataclasses.replace(sched, profile=str(profile)))
    base = engine_profile(engine)
    full = trace_name if isinstance(trace_name, Trace) else load_trace(trace_name)
    trace = full.sliced(start_s, start_s + duration_s)
    scale = None if length_scale == "auto" else float(length_scale)
    trace, scaling = fit_lengths(trace, engine.max_model_len, scale)
    profile_path = engine.profile_path
    if calibrate_s > 0:
        warm = full.sliced(max(0.0, start_s - calibrate_s), start_s)
        warm, _ = fit_lengths(warm, engine.max_model_len, scaling.factor)
        profile_path = calibrate(engine, warm, slo)
        print(f"calibrated the profile on {len(warm)} requests ({engine.latency.num_updates} "
              f"steps, {engine.latency.num_outliers} outliers rejected; host work "
              f"{engine.latency.metadata.get('host_overhead_s', 0.0) * 1e3:.2f} ms per step); "
              f"corrections {engine.latency.metadata['online_refinement']['corrections']}",
              flush=True)
    calibrated = LatencyModel.load(profile_path)  # pristine copy for the simulator
    sim_profile = Profile(base.name, calibrated, base.buckets, base.kv_capacity_tokens,
                          base.page_size,
                          float(calibrated.metadata.get("host_overhead_s", 0.0)))
    return CalibratedSlice(engine, trace, scaling, Path(profile_path), sim_profile)


@dataclasses.dataclass
class PolicyComparison:
    """Policies run one after the other on one engine over the very same requests:
    ``figures[policy]`` holds the engine's and the simulator's figures (``"engine"``,
    ``"simulator"``) and how fast the engine ran against the calibrated profile."""

    trace: Trace  # as run: rate-scaled (and cut to ``max_wall_s``)
    rate_scale: float
    slo: SLO
    sarathi_budget: int
    figures: dict[str, dict[str, Any]]

    def table(self) -> str:
        """A markdown table: one row per policy and executor."""
        lines = ["| policy | executor | P50 TTFT ms | P99 TTFT ms | P99 TPOT ms | TTFT attain "
                 "| TPOT attain | SLO attain | preemptions |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for policy, by_executor in self.figures.items():
            for label in ("engine", "simulator"):
                f = by_executor[label]
                lines.append(f"| {policy} | {label} | {f['ttft_p50_ms']:.0f} "
                             f"| {f['ttft_p99_ms']:.0f} | {f['tpot_p99_ms']:.1f} "
                             f"| {f['ttft_attain']:.3f} | {f['tpot_attain']:.3f} "
                             f"| {f['slo_attain']:.3f} | {f['preemptions']} |")
        return "\n".join(lines)

    def headline(self, baseline: str = "sarathi", policy: str = "fairbatching") -> str:
        """The engine's P99 TTFT ratio and SLO attainment, baseline -> ``policy``."""
        b, p = self.figures[baseline]["engine"], self.figures[policy]["engine"]
        return (f"engine: P99 TTFT {baseline}/{policy} = "
                f"{b['ttft_p99_ms'] / max(p['ttft_p99_ms'], 1e-9):.2f}x; "
                f"SLO attainment {b['slo_attain']:.3f} -> {p['slo_attain']:.3f}")


def _outcome_figures(o: Outcome) -> dict[str, Any]:
    s = o.summary
    return {"ttft_p50_ms": s.ttft.p(50), "ttft_p99_ms": s.ttft.p(99),
            "tpot_p99_ms": s.tpot.p(99), "ttft_attain": s.ttft_attainment,
            "tpot_attain": s.tpot_attainment, "slo_attain": s.slo_attainment,
            "prefill_share": o.share.prefill_share, "preemptions": s.num_preemptions,
            "requests": len(o.records)}


def compare_policies(run: CalibratedSlice, slo: SLO, *,
                     policies: tuple[str, ...] = ("sarathi", "fairbatching"),
                     sarathi_budget: int = 128, rate_scale: float | None = None,
                     load: float = 1.3, max_wall_s: float | None = None,
                     log: Callable[[str], None] | None = None) -> PolicyComparison:
    """Run ``policies`` one after the other on ``run``'s engine over the same requests,
    each beside the simulator's prediction on the calibrated profile. The arrival rate
    is ``rate_scale`` or ``load`` x Sarathi's simulated capacity (99% SLO attainment)
    on the slice; ``max_wall_s`` keeps only the requests arriving in that many seconds
    of the rate-scaled slice (a replay runs in real time)."""
    from fbjax.sim.experiment import capacity, simulate

    log = log or (lambda line: print(line, flush=True))
    engine, sim_profile = run.engine, run.sim_profile
    configs = {p: dataclasses.replace(scheduler_config(engine, p, slo,
                                                       token_budget=sarathi_budget),
                                      profile=str(run.profile_path))
               for p in policies}
    specs = {p: sim_policy_spec(dataclasses.replace(engine.config, scheduler=c), slo)
             for p, c in configs.items()}
    if rate_scale is None:
        cap = capacity(run.trace, specs["sarathi"], sim_profile, slo, lo=0.25, hi=16.0)
        rate_scale = load * cap.rate_scale
        log(f"simulated Sarathi capacity: rate scale {cap.rate_scale:.2f}; running at "
            f"{load} x that = {rate_scale:.2f}")
    trace = run.trace.scaled(rate_scale)
    if max_wall_s is not None:
        trace = trace.sliced(0.0, max_wall_s)
    if not len(trace):
        raise ValueError(f"no request of {run.trace.name} arrives in the first "
                         f"{max_wall_s} s at rate scale {rate_scale:.2f}")
    log(f"{trace.name}: {len(trace)} requests over {trace.duration_s:.0f} s "
        f"({trace.mean_rate:.2f} req/s); {run.scaling.describe()}; SLO {slo.describe()}; "
        f"Sarathi budget {sarathi_budget} tokens; profile {engine.profile_path}")
    figures: dict[str, dict[str, Any]] = {}
    for policy in policies:
        sim = simulate(trace, specs[policy], sim_profile, slo)
        engine.use_scheduler(configs[policy])
        stats: dict = {}
        real = replay_engine(engine, trace, slo, engine_profile(engine), policy=policy,
                             reference=sim_profile.latency, stats=stats)
        speed = stats["measured_s"] / max(stats["predicted_s"], 1e-12)
        figures[policy] = {"engine_speed_vs_profile": speed,
                           "engine": _outcome_figures(real),
                           "simulator": _outcome_figures(sim)}
        log(f"{policy}: engine done ({len(real.result.steps)} steps; runner time "
            f"{speed:.2f}x the calibrated profile's prediction)")
    return PolicyComparison(trace, rate_scale, slo, sarathi_budget, figures)
