"""Where an engine step's time goes, on the bench_engine workload (built-in model).

Two views, because wall-clock time on a shared 2-core machine is too noisy to split
finely:

1. **Phases, wall clock**: the engine runs ``--concurrency`` requests of
   ``--output_len`` greedy tokens; ``schedule``, ``build_batch``, the executable call
   (``dispatch``: returns once the step is queued or, on a busy CPU, done), the wait
   for the sampled tokens, ``on_step_done`` and output collection are timed per step,
   and device time per bucket.
2. **Attention share, CPU time**: every step of the ``--buckets`` buckets captured in
   (1) is replayed through the full step (donated cache), through the same step with
   attention replaced by the identity, and with each ``--compare_impls``
   implementation; ``time.process_time`` counts all XLA threads and ignores time spent
   descheduled, so the difference is the attention's own work (wall time is shown too).

    python scripts/profile_engine_step.py [--concurrency 32] [--output_len 128]
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import random
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_integer("concurrency", 32, "Concurrent requests.")
flags.DEFINE_integer("output_len", 128, "Tokens generated per request (EOS ignored).")
flags.DEFINE_integer("min_prompt", 32, "Shortest prompt (tokens).")
flags.DEFINE_integer("max_prompt", 256, "Longest prompt (tokens).")
flags.DEFINE_list("buckets", ["32x32", "256x32"], "Buckets (TOKENSxSEQS) replayed in (2).")
flags.DEFINE_integer("replays", 4, "Replays per variant in (2); the least time is kept.")
flags.DEFINE_list("compare_impls", [], "Other attention implementations to replay in (2), "
                  "e.g. xla.")
flags.DEFINE_integer("seed", 0, "Seed for prompts.")


def _timed(totals: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - start
        return out
    return wrapper


def profile_phases(engine, prompts, params) -> list:
    """Run the batch once with phase timers; returns the batches it executed."""
    import numpy as np

    import fbjax.engine.engine as engine_module
    from fbjax.engine.runner import StepResult

    totals: dict = collections.defaultdict(float)
    per_bucket: dict = collections.defaultdict(lambda: [0, 0.0])
    captured = []
    runner, scheduler = engine.runner, engine.scheduler

    def run(batch):
        bucket = (batch.tokens.shape[0], batch.logits_indices.shape[0])
        captured.append(copy.deepcopy(batch))
        start = time.perf_counter()
        tokens, logprobs, runner.kv_cache, runner.penalty_state = runner.executables.get(
            bucket)(runner.params, runner.kv_cache, runner.penalty_state, batch)
        queued = time.perf_counter()
        out = np.asarray(tokens)
        done = time.perf_counter()
        totals["dispatch"] += queued - start
        totals["wait for tokens"] += done - queued
        per_bucket[bucket][0] += 1
        per_bucket[bucket][1] += done - start
        return StepResult(out, logprobs)

    saved = (scheduler.schedule, scheduler.on_step_done, engine_module.build_batch,
             runner.run, engine._collect_outputs)
    scheduler.schedule = _timed(totals, "schedule", saved[0])
    scheduler.on_step_done = _timed(totals, "on_step_done", saved[1])
    engine_module.build_batch = _timed(totals, "build_batch", saved[2])
    runner.run = run
    engine._collect_outputs = _timed(totals, "collect outputs", saved[4])
    try:
        start = time.perf_counter()
        engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
    finally:
        (scheduler.schedule, scheduler.on_step_done, engine_module.build_batch,
         runner.run, engine._collect_outputs) = saved
    steps = len(captured)
    tokens = sum(p.max_tokens for p in params)
    print(f"(1) {tokens / elapsed:.0f} output tok/s, {elapsed * 1e3:.0f} ms, {steps} steps")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {name:18s} {seconds * 1e3:8.1f} ms  {seconds * 1e3 / steps:6.3f} ms/step")
    for bucket, (count, seconds) in sorted(per_bucket.items(), key=lambda kv: -kv[1][1]):
        print(f"    bucket {str(bucket):11s} {count:4d} steps {seconds * 1e3:8.1f} ms  "
              f"{seconds * 1e3 / count:6.2f} ms/step (call + wait)")
    return captured


def attention_share(engine, batches) -> None:
    """CPU and wall time of the replayed steps with and without attention, and with
    each implementation in ``--compare_impls``; variants interleaved per replay."""
    import jax
    from fbjax_kernels.ragged_paged_attention import get_attention, resolve_impl

    from fbjax.engine.runner import make_step_fn
    from fbjax.model.llama import LlamaForCausalLM

    runner = engine.runner
    variants = {f"full step ({resolve_impl(engine.config.attention_impl)})":
                runner.model.attention_fn}
    for impl in FLAGS.compare_impls:
        variants[f"full step ({impl})"] = get_attention(impl)
    variants["attention = identity"] = lambda q, *args, **kwargs: q
    kv, state = runner.kv_cache, runner.penalty_state
    steps = {}
    for name, attention_fn in variants.items():
        model = LlamaForCausalLM(engine.model_config, attention_fn, runner.model.dtype)
        steps[name] = jax.jit(make_step_fn(model), donate_argnums=(1, 2))
        for batch in batches:  # compile every shape outside the timing
            tokens, _, kv, state = steps[name](runner.params, kv, state, batch)
    jax.block_until_ready(tokens)
    cpu = dict.fromkeys(variants, float("inf"))
    wall = dict.fromkeys(variants, float("inf"))
    for _ in range(FLAGS.replays):
        for name, step in steps.items():
            start, start_wall = time.process_time(), time.perf_counter()
            for batch in batches:
                tokens, _, kv, state = step(runner.params, kv, state, batch)
            jax.block_until_ready(tokens)
            cpu[name] = min(cpu[name], time.process_time() - start)
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
    runner.kv_cache, runner.penalty_state = kv, state
    rest_cpu, rest_wall = cpu["attention = identity"], wall["attention = identity"]
    print(f"(2) {len(batches)} replayed steps (least of {FLAGS.replays} replays):")
    for name in variants:
        line = f"    {name:28s} CPU {cpu[name] * 1e3:7.1f} ms  wall {wall[name] * 1e3:7.1f} ms"
        if name != "attention = identity":
            line += (f"  -> attention CPU {(cpu[name] - rest_cpu) * 1e3:6.1f} ms "
                     f"({(cpu[name] - rest_cpu) / cpu[name]:.0%}), wall "
                     f"{(wall[name] - rest_wall) * 1e3:6.1f} ms")
        print(line)


def main(argv):
    del argv
    from fbjax.config import EngineConfig
    from fbjax.engine.engine import LLMEngine
    from fbjax.sched.request import SamplingParams

    engine = LLMEngine(dataclasses.replace(EngineConfig(), show_progress=False))
    rng = random.Random(FLAGS.seed)
    prompts = [[256] + [rng.randrange(32, 127) for _ in range(
        rng.randint(FLAGS.min_prompt, FLAGS.max_prompt) - 1)]
        for _ in range(FLAGS.concurrency)]
    params = [SamplingParams(max_tokens=FLAGS.output_len, temperature=0.0, ignore_eos=True)
              for _ in prompts]
    engine.generate(prompts[:1], params[:1])  # warm caches; nothing compiles here
    captured = profile_phases(engine, prompts, params)
    wanted = {tuple(int(x) for x in b.split("x")) for b in FLAGS.buckets}
    replay = [b for b in captured
              if (b.tokens.shape[0], b.logits_indices.shape[0]) in wanted]
    if replay:
        attention_share(engine, replay)


if __name__ == "__main__":
    app.run(main)
