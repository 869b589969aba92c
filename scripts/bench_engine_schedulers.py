"""FairBatching vs Sarathi-Serve on the real engine, side by side in one run.

An Azure conv slice (lengths scaled to the built-in model's context) at a load where
Sarathi misses its TTFT SLO: ``--load`` x Sarathi's capacity as the simulator finds it
on the engine's profile (99% SLO attainment), unless ``--rate_scale`` is given. The profile is first
brought up to the machine's present state by ``--calibrate_s`` seconds of the trace
before the slice, replayed with online refinement (step times on a shared CPU drift).
Both policies then run the very same requests on one compiled engine (real tokens,
wall-clock time), one after the other, and the table shows P50/P99 TTFT, P99 TPOT,
TTFT/TPOT/SLO attainment of each, with the simulator's prediction beside each row.
CPU timings on a shared machine are noisy: rerun before trusting a single figure.

    python scripts/bench_engine_schedulers.py --duration_s 60 --load 1.3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_string("trace", "azure_llm_2023_conv", "Trace name or path.")
flags.DEFINE_float("start_s", 600.0, "Slice start (seconds into the trace).")
flags.DEFINE_float("duration_s", 60.0, "Slice length (seconds of trace time).")
flags.DEFINE_float("rate_scale", None, "Arrival-rate scale; default: --load x Sarathi's "
                   "simulated capacity.")
flags.DEFINE_float("load", 1.3, "Multiple of Sarathi's simulated capacity to run at.")
flags.DEFINE_string("length_scale", "auto", "Prompt/output length factor or 'auto'.")
flags.DEFINE_float("slo_ttft_ms", 1500.0, "TTFT SLO (ms).")
flags.DEFINE_float("slo_tpot_ms", 60.0, "TPOT SLO (ms).")
flags.DEFINE_integer("sarathi_budget", 128, "Sarathi token budget.")
flags.DEFINE_string("profile", None, "Engine profile (default the known <device>-"
                    "<model>.json).")
flags.DEFINE_float("calibrate_s", 20.0, "Seconds of trace before the slice replayed on the "
                   "engine first, to refine the profile online (0: use it as recorded).")
flags.DEFINE_string("json", None, "Write all figures here.")


def main(argv):
    del argv
    from fbjax.replay.engine import calibrated_slice, compare_policies
    from fbjax.sim.experiment import SLO

    slo = SLO(FLAGS.slo_ttft_ms / 1e3, FLAGS.slo_tpot_ms / 1e3)
    run = calibrated_slice(FLAGS.trace, FLAGS.start_s, FLAGS.duration_s, FLAGS.length_scale,
                           FLAGS.calibrate_s, slo, FLAGS.profile)
    result = compare_policies(run, slo, sarathi_budget=FLAGS.sarathi_budget,
                              rate_scale=FLAGS.rate_scale, load=FLAGS.load)
    print("\n" + result.table())
    print("\n" + result.headline())
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps({
            "trace": result.trace.name, "rate_scale": result.rate_scale,
            "length_scaling": run.scaling.describe(), "slo": slo.describe(),
            "profile": run.sim_profile.name, "calibrate_s": FLAGS.calibrate_s,
            "results": result.figures},
            indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
