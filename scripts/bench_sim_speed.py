"""Simulator and scheduler speed, measured side by side in one run.

1. Wall time to replay the whole azure_llm_2023_conv trace (one hour, 19,366 requests)
   on one instance for each policy (goal: <= 10 s on a 2-core machine).
2. The scheduler's cost of forming one step with 256 running decodes and 1,000 waiting
   prompts (goal: FairBatching <= 100 us and <= 2x Sarathi), per step and per scheduled
   chunk: FairBatching schedules all 256 decodes, Sarathi at most 128 sequences. First on
   a fresh copy of the state for every call (cold in the CPU caches: each request field
   read is a cache miss), then in steady state: the engine's loop of schedule() and
   on_step_done() on one loaded state, where the previous step has just touched the
   requests it ran.

    python scripts/bench_sim_speed.py [--profile a100-llama3-8b]
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax.profiling.store import load_profile  # noqa: E402
from fbjax.sched.fairbatching import FairBatchingConfig  # noqa: E402
from fbjax.sched.request import Request, SamplingParams  # noqa: E402
from fbjax.sim.experiment import SLO, simulate  # noqa: E402
from fbjax.sim.instance import PolicySpec, build_scheduler  # noqa: E402
from fbjax.sim.simulator import plan_features  # noqa: E402
from fbjax.traces import load_trace  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", "a100-llama3-8b", "Latency profile.")
flags.DEFINE_string("trace", "azure_llm_2023_conv", "Trace to replay in full.")
flags.DEFINE_integer("running", 256, "Running decodes in the per-step benchmark.")
flags.DEFINE_integer("waiting", 1000, "Waiting prompts in the per-step benchmark.")
flags.DEFINE_integer("repeats", 300, "Schedule calls timed per policy.")

SLO_DEFAULT = SLO(3.0, 0.1)


def policies() -> list[PolicySpec]:
    fb = FairBatchingConfig(ttft_slo_s=SLO_DEFAULT.ttft_s, tpot_slo_s=SLO_DEFAULT.tpot_s)
    return [PolicySpec("vllm", token_budget=512), PolicySpec("sarathi", token_budget=512),
            PolicySpec("fairbatching", fairbatching=fb)]


def loaded_state(spec: PolicySpec, profile, running: int, waiting: int):
    """A scheduler holding ``running`` decoding requests and ``waiting`` prompts."""
    sched = build_scheduler(spec, profile)
    now = 100.0
    for i in range(running):
        r = Request(f"r{i}", [], SamplingParams(max_tokens=4096, ignore_eos=True),
                    now - 5.0 - i * 0.01, prompt_len=500 + i)
        sched.add_request(r)
        sched.admit(r, now - 5.0)
        sched.kv.ensure(r.request_id, r.prompt_len + 10)
        r.num_computed_tokens = r.prompt_len
        for j in range(10):
            r.append_output(0, now - 4.0 + j * 0.05 + i * 1e-4)
        r.num_computed_tokens = r.num_tokens - 1
    for i in range(waiting):
        sched.add_request(Request(f"w{i}", [], SamplingParams(max_tokens=100, ignore_eos=True),
                                  now - 1.0 + i * 1e-3, prompt_len=200 + i % 500))
    return sched, now


def per_step_costs(specs: list[PolicySpec], profile, repeats: int
                   ) -> dict[str, tuple[float, int]]:
    """Median seconds per schedule() and chunks per plan, for each policy. Every call
    gets a fresh copy of the loaded state, built untimed; the garbage collector waits
    during the call (a collection of the set-up's garbage is not the scheduler's cost;
    a full gc.collect() before each call would evict the caches instead), and the last
    call's plan is dropped before the clock starts (freeing it, with the requests only
    it still held, cost more than a schedule() and was charged to the next policy).
    The policies take turns, so a load spike on this shared machine hits them alike."""
    times: dict[str, list[float]] = {spec.name: [] for spec in specs}
    chunks: dict[str, int] = {}
    for _ in range(repeats):
        for spec in specs:
            plan = sched = None  # the last call's objects go now, untimed
            sched, now = loaded_state(spec, profile, FLAGS.running, FLAGS.waiting)
            gc.disable()
            start = time.perf_counter()
            plan = sched.schedule(now)
            elapsed = time.perf_counter() - start
            gc.enable()
            times[spec.name].append(elapsed)
            chunks[spec.name] = plan.num_seqs
    return {name: (statistics.median(t), chunks[name]) for name, t in times.items()}


def steady_costs(specs: list[PolicySpec], profile, repeats: int, steps: int = 12,
                 warmup: int = 2) -> dict[str, tuple[float, int]]:
    """Median seconds per schedule() and chunks per plan in steady state: on a fresh
    loaded state, ``steps`` steps of schedule(), then on_step_done() at the time the
    profile predicts for the plan; the first ``warmup`` calls are not counted."""
    times: dict[str, list[float]] = {spec.name: [] for spec in specs}
    chunks: dict[str, list[int]] = {spec.name: [] for spec in specs}
    for _ in range(repeats):
        for spec in specs:
            plan = sched = None
            sched, now = loaded_state(spec, profile, FLAGS.running, FLAGS.waiting)
            for step in range(steps):
                gc.disable()
                start = time.perf_counter()
                plan = sched.schedule(now)
                elapsed = time.perf_counter() - start
                gc.enable()
                if step >= warmup:
                    times[spec.name].append(elapsed)
                    chunks[spec.name].append(plan.num_seqs)
                now += profile.latency.predict(plan.bucket, plan_features(plan))
                sched.on_step_done(plan, {c.request.request_id: 0 for c in plan.chunks
                                          if c.completes}, now)
    return {name: (statistics.median(t), round(statistics.median(chunks[name])))
            for name, t in times.items()}


def print_costs(costs: dict[str, tuple[float, int]]) -> None:
    print("| policy | chunks | us per step | vs sarathi | us per chunk | vs sarathi |")
    print("|---|---:|---:|---:|---:|---:|")
    ref, ref_chunks = costs["sarathi-512"]
    for name, (cost, chunks) in costs.items():
        per_chunk = cost / max(chunks, 1)
        print(f"| {name} | {chunks} | {cost * 1e6:.1f} | {cost / ref:.2f}x | "
              f"{per_chunk * 1e6:.2f} | {per_chunk / (ref / max(ref_chunks, 1)):.2f}x |")


def main(argv):
    del argv
    profile = load_profile(FLAGS.profile)
    trace = load_trace(FLAGS.trace)
    print(f"full replay of {trace.name}: {len(trace)} requests, {trace.duration_s:.0f} s, "
          f"profile {profile.name}")
    print("(cpu s: this process's CPU time, less sensitive than wall time to other "
          "work on the machine)")
    print("| policy | wall s | cpu s | steps | steps/s |")
    print("|---|---:|---:|---:|---:|")
    for spec in policies():
        start, cpu = time.perf_counter(), time.process_time()
        outcome = simulate(trace, spec, profile, SLO_DEFAULT)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        steps = len(outcome.result.steps)
        print(f"| {spec.name} | {wall:.2f} | {cpu:.2f} | {steps} | {steps / wall:.0f} |",
              flush=True)
    del outcome  # a whole replay's objects would slow every collection below

    print(f"\nschedule() with {FLAGS.running} running decodes and {FLAGS.waiting} waiting "
          f"prompts, a fresh state per call (median of {FLAGS.repeats}; Sarathi caps a step "
          "at 128 sequences, so per chunk is the like-for-like figure)")
    print_costs(per_step_costs(policies(), profile, FLAGS.repeats))
    steady_repeats = max(1, FLAGS.repeats // 10)
    print(f"\nthe same in steady state: schedule() and on_step_done() in turn, 10 steps "
          f"counted on each of {steady_repeats} loaded states")
    print_costs(steady_costs(policies(), profile, steady_repeats))


if __name__ == "__main__":
    app.run(main)
