"""Build GPU latency profiles (fbjax/configs/profiles/<device>-<model>.json) from vidur data.

Measured linear-op timings and modelled attention (see fbjax/sched/vidur.py) give
each step plan's time on each bucket; a LatencyModel is fitted on many synthetic plans.
Prints one row per profile and the README's worked numbers recomputed with the recipe.

    python scripts/build_gpu_profiles.py [--shared ../shared] [--out_dir fbjax/configs/profiles]
        [--devices a100-llama3-8b,h100-llama2-7b,a100-llama2-7b]
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax.profiling import vidur  # noqa: E402
from fbjax.sched.latency import StepFeatures  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLAGS = flags.FLAGS
flags.DEFINE_string("shared", None, "Shared data dir (holds data/profiles/vidur); default "
                    "$FBJAX_SHARED or <repo>/../shared.")
flags.DEFINE_string("out_dir", "fbjax/configs/profiles", "Where to write the JSON profiles "
                    "(relative to the repo root unless absolute).")
flags.DEFINE_list("devices", list(vidur.DEFAULT_PROFILES),
                  f"Profiles to build, <device>-<model>; known: {sorted(vidur.PROFILES)}.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic step plans.")


def summary_row(name: str, latency, recipe) -> dict:
    buckets = vidur.GPU_BUCKETS

    def step(chunks: list) -> tuple[float, float]:
        feats = StepFeatures.of_chunks(chunks)
        bucket = buckets.pick(feats.num_tokens, feats.num_seqs)
        return latency.predict(bucket, feats) * 1e3, recipe.step_ms(bucket, chunks)

    return {"profile": name, "device": recipe.device, "model": recipe.model,
            "decode_b32_kv2048": step([(1, 2048, True)] * 32),
            "prefill_512": step([(512, 512, False)]),
            "prefill_2048": step([(2048, 2048, False)]),
            "mape": latency.heldout.mape, "p95_ms": latency.heldout.p95_abs_ms,
            "kv_capacity": latency.metadata["kv_capacity_tokens"],
            "grid": latency.metadata["grid_point_errors"]}


def main(argv: list[str]) -> None:
    del argv
    shared = Path(FLAGS.shared) if FLAGS.shared else vidur.default_shared_dir()
    root = vidur.vidur_dir(shared)
    if not root.is_dir():
        sys.exit(f"no vidur profiles under {root}; pass --shared or set FBJAX_SHARED")
    out_dir = Path(FLAGS.out_dir)
    if not out_dir.is_absolute():
        out_dir = REPO / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = [d for d in FLAGS.devices if d not in vidur.PROFILES]
    if unknown:
        sys.exit(f"unknown profiles {unknown}; known: {sorted(vidur.PROFILES)}")

    rows = []
    for name in FLAGS.devices:
        device, model = vidur.PROFILES[name]
        latency, recipe = vidur.build_profile(device, model, shared, seed=FLAGS.seed)
        path = out_dir / f"{name}.json"
        latency.save(path)
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        rows.append(summary_row(name, latency, recipe))

    print("\nStep times in ms: profile prediction (recipe truth); decode = 32 decodes at kv "
          "2048, prefill = one chunk, no prefix. Held-out error over synthetic plans.")
    header = (f"{'device':6} {'model':10} {'decode b32/kv2048':>18} {'prefill 512':>16} "
              f"{'prefill 2048':>17} {'MAPE':>6} {'p95 ms':>7} {'KV tokens':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [f"{p:7.2f} ({t:7.2f})" for p, t in
                 (r["decode_b32_kv2048"], r["prefill_512"], r["prefill_2048"])]
        print(f"{r['device']:6} {r['model']:10} {cells[0]:>18} {cells[1]:>16} {cells[2]:>17} "
              f"{r['mape'] * 100:5.2f}% {r['p95_ms']:7.2f} {r['kv_capacity']:>10,}")

    print("\nGrid steps (one prefill chunk at each measured mlp.csv num_tokens; pure decode, "
          "batch 1-256 x kv 128-8192): profile vs recipe on the padded bucket (fit), and vs "
          "vidur's unpadded iteration (no buckets, no LM head; mean ratio = what padding "
          "and LM head add).")
    print(f"{'profile':16} {'kind':8} {'points':>6} {'fit MAPE':>9} {'fit p95 ms':>10} "
          f"{'vs vidur MAPE':>13} {'mean ratio':>10}")
    for r in rows:
        for kind, e in r["grid"].items():
            print(f"{r['profile']:16} {kind:8} {e['num_points']:6d} {e['fit']['mape'] * 100:8.2f}% "
                  f"{e['fit']['p95_abs_ms']:10.2f} {e['vs_vidur']['mape'] * 100:12.1f}% "
                  f"{e['vs_vidur']['mean_ratio']:10.3f}")

    print("\nMeasured linear-op speed vs A100 (Llama-2-7B, one layer) against the peak ratios "
          "used to move attention:")
    base = vidur.load_linear_ops(root / "compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv")
    for device in ("h100", "a40"):
        other = vidur.load_linear_ops(
            root / f"compute/{device}/meta-llama/Llama-2-7b-hf/mlp.csv")
        peaks, ref = vidur.DEVICES[device], vidur.DEVICES["a100"]
        print(f"  {device}: 16 tokens {base.layer_ms(16) / other.layer_ms(16):.2f}x "
              f"(bandwidth ratio {peaks['hbm_tb_s'] / ref['hbm_tb_s']:.2f}x), 4096 tokens "
              f"{base.layer_ms(4096) / other.layer_ms(4096):.2f}x (bf16 ratio "
              f"{peaks['bf16_tflop_s'] / ref['bf16_tflop_s']:.2f}x)")

    print("\nAttention calibration on legacy/a100/attention.csv (per layer, A100, 70B TP2):")
    cal = vidur.calibrate_attention(root / "legacy" / "a100" / "attention.csv")
    print(f"  decode  a0={cal.decode[0] * 1e3:.1f} us  effective {1e-9 / cal.decode[1]:.2f} TB/s"
          f"  MAPE {cal.decode_error['mape'] * 100:.1f}%  p95 APE "
          f"{cal.decode_error['p95_ape'] * 100:.1f}%")
    print(f"  prefill b0={cal.prefill[0] * 1e3:.1f} us  prefix {1e-9 / cal.prefill[1]:.0f} "
          f"TFLOP/s  causal {1e-9 / cal.prefill[2]:.0f} TFLOP/s  MAPE "
          f"{cal.prefill_error['mape'] * 100:.1f}% (one FLOP slope: "
          f"{cal.prefill_single_slope_error['mape'] * 100:.1f}%)")

    print("\nREADME worked examples vs this recipe:")
    for c in vidur.readme_checks(shared):
        print(f"  {c['name']:58} README {c['expected']:7.4f}  recipe {c['got']:7.4f}  "
              f"({c['rel_err'] * 100:4.1f}%)")


if __name__ == "__main__":
    app.run(main)
