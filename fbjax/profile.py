"""Learn each compiled bucket's step time on this machine: ``python -m fbjax.profile``.

Builds the engine (``--model``, the default model unless given), runs its AOT-compiled buckets
over a grid of step contents (decodes and their contexts, prefill chunks and their
prefixes; see ``fbjax.profiling.measure``) with warm-up and repeats, fits the per-bucket latency
model, and writes the profile with its provenance (device, model, bucket set, JAX
version) and held-out error (MAPE, p95 absolute error; every 5th point per bucket is
held out of the fit that is scored, then the model is refitted on everything).

    python -m fbjax.profile --plot fit.png
    python -m fbjax.profile --model builtin-tiny \\
        --out fbjax/configs/profiles/cpu-builtin-tiny.json  # to commit

Without ``--out`` the profile goes to ``<user cache>/fbjax/profiles/<device>-<model>.json``
(``fbjax.profiling.store.user_profiles_dir``), where the engine looks first for
FairBatching. Timings on a shared machine are noisy: each point keeps the minimum of
its ``--repeats`` runs by default (interference only adds time; ``--statistic median``
keeps the median).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from fbjax import cli_flags
from fbjax.cli_flags import engine_config_from_flags
from fbjax.config import ConfigError

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli_flags)  # --model, --dtype, --scheduler... in --help
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
    from fbjax.profiling.measure import GridSettings, plot_profile, record_profile
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
    settings = GridSettings(FLAGS.points_per_bucket, FLAGS.warmup, FLAGS.repeats,
                            FLAGS.statistic, FLAGS.time_limit_s, FLAGS.grid_seed)
    device, model = engine.device_key, engine.model_key
    out = Path(FLAGS.out) if FLAGS.out else default_profile_path(device, model)
    print(f"profiling {model} on {device}: {len(config.buckets.pairs())} buckets, "
          f"{settings.points_per_bucket} grid points each x ({settings.warmup} warm-up + "
          f"{settings.repeats} timed)", file=sys.stderr)
    try:
        rec = record_profile(engine, settings, "python -m fbjax.profile")
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.dump:
        Path(FLAGS.dump).write_text(json.dumps([
            {"bucket": list(m.point.bucket), "chunks": [list(c) for c in m.point.chunks],
             "samples": m.samples} for m in rec.measurements]) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    rec.model.save(out)
    h = rec.model.heldout
    print(f"measured {len(rec.measurements)}/{rec.planned} points in {rec.seconds:.0f} s; "
          f"held-out error over {h.num_points} points: MAPE {h.mape * 100:.1f}%, p95 "
          f"absolute {h.p95_abs_ms:.2f} ms")
    print(f"profile written to {out}")
    if FLAGS.plot:
        plot_profile(rec.model, rec.measurements, FLAGS.plot,
                     f"{model} on {device}: held-out MAPE {h.mape * 100:.1f}%, "
                     f"p95 |err| {h.p95_abs_ms:.2f} ms")
        print(f"plot written to {FLAGS.plot}")
    return 0


if __name__ == "__main__":
    app.run(main)
