"""Learn each compiled bucket's step time on this machine: ``python -m fbjax.profile``.

Builds the engine (the built-in model unless ``--model``), runs its AOT-compiled buckets
over a grid of step contents (decodes and their contexts, prefill chunks and their
prefixes; see ``fbjax.profiling.measure``) with warm-up and repeats, fits the per-bucket latency
model, and writes the profile with its provenance (device, model, bucket set, JAX
version) and held-out error (MAPE, p95 absolute error; every 5th point per bucket is
held out of the fit that is scored, then the model is refitted on everything).

    python -m fbjax.profile --plot fit.png
    python -m fbjax.profile --out fbjax/configs/profiles/cpu-builtin-tiny.json  # to commit

Without ``--out`` the profile goes to ``<user cache>/fbjax/profiles/<device>-<model>.json``
(``fbjax.profiling.store.user_profiles_dir``), where the engine looks first for
FairBatching. Timings on a shared machine are noisy: each point keeps the minimum of
its ``--repeats`` runs by default (interference only adds time; ``--statistic median``
keeps the median).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

from fbjax.cli_flags import engine_config_from_flags
from fbjax.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the profile (default: "
                    "<device>-<model>.json in the user's profile cache, $FBJAX_PROFILE_DIR "
                    "or ~/.cache/fbjax/profiles).")
flags.DEFINE_integer("points_per_bucket", 24, "Step contents measured per bucket.")
flags.DEFINE_integer("warmup", 1, "Untimed runs before each point's repeats.")
flags.DEFINE_integer("repeats", 5, "Timed runs per point, in passes over the whole grid.")
flags.DEFINE_enum("statistic", "min", ["min", "median"], "Which of a point's repeats is its "
                  "time: min (interference only adds time) or median.")
flags.DEFINE_string("dump", None, "Also write every raw sample to this JSON file.")
flags.DEFINE_float("time_limit_s", None, "Stop measuring after this many seconds (the grid "
                   "is walked round-robin over buckets, so every bucket gets points).")
flags.DEFINE_integer("grid_seed", 0, "Seed of the grid of step contents.")
flags.DEFINE_string("plot", None, "Draw predicted vs measured per bucket to this PNG.")


def main(argv: list[str]) -> int:
    del argv
    import dataclasses

    from fbjax.engine.engine import LLMEngine
    from fbjax.profiling.measure import (
        engine_metadata,
        fit_profile,
        measure,
        plot_profile,
        profile_grid,
    )
    from fbjax.profiling.store import ProfileError, default_profile_path

    try:
        config = engine_config_from_flags()
        # The profile is of the runner: any policy that needs no profile will do.
        config = dataclasses.replace(config, scheduler=dataclasses.replace(
            config.scheduler, policy="vllm", profile=None))
        engine = LLMEngine(config)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = engine_metadata(engine)
    out = Path(FLAGS.out) if FLAGS.out else default_profile_path(meta["device"], meta["model"])
    points = profile_grid(config.buckets, FLAGS.points_per_bucket,
                          max_context=engine.max_model_len - 1,
                          max_kv_tokens=engine.kv.capacity_tokens,
                          page_size=engine.kv.page_size, seed=FLAGS.grid_seed)
    print(f"profiling {meta['model']} on {meta['device']} "
          f"({meta['device_detail'].get('cpu', meta['device_detail']['device_kind'])}): "
          f"{len(config.buckets.pairs())} buckets, {len(points)} grid points x "
          f"({FLAGS.warmup} warm-up + {FLAGS.repeats} timed)", file=sys.stderr)
    start = time.monotonic()
    with tqdm(total=len(points) * FLAGS.repeats, desc="measuring", unit="run",
              file=sys.stderr) as bar:
        measurements = measure(engine, points, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                               statistic=FLAGS.statistic,
                               time_limit_s=FLAGS.time_limit_s,
                               progress=lambda done, total: bar.update(done - bar.n))
    elapsed = time.monotonic() - start
    meta["grid"] = {"points_per_bucket": FLAGS.points_per_bucket, "measured": len(measurements),
                    "planned": len(points), "warmup": FLAGS.warmup, "repeats": FLAGS.repeats,
                    "seed": FLAGS.grid_seed, "statistic": f"{FLAGS.statistic} of repeats",
                    "seconds": round(elapsed, 1), "time_limit_s": FLAGS.time_limit_s}
    meta["buckets_profiled"] = [list(b) for b in config.buckets.pairs()]
    try:
        model = fit_profile(measurements, meta)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.dump:
        Path(FLAGS.dump).write_text(json.dumps([
            {"bucket": list(m.point.bucket), "chunks": [list(c) for c in m.point.chunks],
             "samples": m.samples} for m in measurements]) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    h = model.heldout
    print(f"measured {len(measurements)}/{len(points)} points in {elapsed:.0f} s; held-out "
          f"error over {h.num_points} points: MAPE {h.mape * 100:.1f}%, p95 absolute "
          f"{h.p95_abs_ms:.2f} ms")
    print(f"profile written to {out}")
    if FLAGS.plot:
        plot_profile(model, measurements, FLAGS.plot,
                     f"{meta['model']} on {meta['device']}: held-out MAPE "
                     f"{h.mape * 100:.1f}%, p95 |err| {h.p95_abs_ms:.2f} ms")
        print(f"plot written to {FLAGS.plot}")
    return 0


if __name__ == "__main__":
    app.run(main)
