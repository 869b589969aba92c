"""Measure the engine's compiled buckets and fit its latency profile.

``python -m fbjax.profile`` (the CLI in ``fbjax/profile.py``) runs the engine's own
compiled buckets over a grid of step contents with this module and fits the per-bucket
``LatencyModel``; :mod:`fbjax.profiling.store` saves, finds and checks the result.

**Grid.** For each bucket ``(T, S)``, steps that the engine would actually run on it
(``BucketConfig.pick`` of their size is that bucket): decode-only, prefill-only and
mixed steps, with the number of sequences, the split between decodes and prompt
chunks, decode context lengths and prefill prefix lengths drawn log-uniformly from a
seeded generator. Corner points (the bucket full of prefill with no prefix, all decodes
at the longest context) are always included. Points are measured round-robin over
buckets so a run cut short by the time limit still covers every bucket evenly.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from fbjax.config import BucketConfig
from fbjax.profiling.device import current_device_key, device_detail
from fbjax.profiling.store import ProfileError, model_key
from fbjax.sched.latency import FEATURES, FORMAT, LatencyModel, StepFeatures

Bucket = tuple[int, int]
Chunk = tuple[int, int, bool]  # (q_len, kv_len, is_decode), as StepFeatures.add takes


# ----- the grid -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GridPoint:
    bucket: Bucket
    chunks: tuple[Chunk, ...]

    @property
    def features(self) -> StepFeatures:
        return StepFeatures.of_chunks(self.chunks)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    if hi <= lo:
        return lo
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` positive integers (a random composition)."""
    if parts == 1:
        return [total]
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [total], strict=True)]


def bucket_grid(buckets: BucketConfig, bucket: Bucket, num_points: int, *, max_context: int,
                max_kv_tokens: int, page_size: int, seed: int = 0) -> list[GridPoint]:
    """``num_points`` step contents that ``buckets.pick`` puts on ``bucket``."""
    tokens, seqs = bucket
    ti, si = buckets.token_buckets.index(tokens), buckets.seq_buckets.index(seqs)
    prev_t = buckets.token_buckets[ti - 1] if ti else 0
    prev_s = buckets.seq_buckets[si - 1] if si else 0
    rng = random.Random(seed * 1_000_003 + tokens * 1009 + seqs)
    points: list[GridPoint] = []

    def feasible(n_tok: int, n_seq: int) -> bool:
        return buckets.pick(n_tok, n_seq) == bucket

    def pages(chunks) -> int:
        return sum(-(-kv // page_size) for _, kv, _ in chunks)

    def add(chunks: list[Chunk]) -> bool:
        n_tok = sum(q for q, _, _ in chunks)
        if (not chunks or not feasible(n_tok, len(chunks))
                or pages(chunks) * page_size > max_kv_tokens
                or max(kv for _, kv, _ in chunks) > max_context):
            return False
        points.append(GridPoint(bucket, tuple(chunks)))
        return True

    n_max = min(seqs, tokens)
    # Corners: a full bucket of fresh prefill; all decodes at the longest context.
    add([(tokens, tokens, False)] if seqs == 1 or prev_s == 0 else
        [(tokens - prev_s, tokens - prev_s, False)] + [(1, 1 + 16, True)] * prev_s)
    ctx = max(2, min(max_context, max_kv_tokens // max(n_max, 1) - page_size))
    add([(1, ctx, True)] * n_max)
    attempts = 0
    while len(points) < num_points and attempts < 50 * num_points:
        attempts += 1
        n_seq = rng.randint(prev_s + 1, n_max) if prev_s < n_max else n_max
        lo = n_seq if seqs > prev_t else max(prev_t + 1, n_seq)
        if lo > tokens:
            continue
        kind = rng.choice(("decode", "prefill", "mixed", "mixed"))
        if kind == "decode" or n_seq == 1 and kind == "mixed":
            n_dec = n_seq if kind == "decode" else 0
        else:
            n_dec = 0 if kind == "prefill" else rng.randint(1, n_seq - 1)
        n_pre = n_seq - n_dec
        if n_pre == 0:
            n_tok = n_dec
        else:
            n_tok = rng.randint(max(lo, n_dec + n_pre), tokens)
        budget_ctx = max(2, max_kv_tokens // max(n_seq, 1) - page_size)
        top = max(2, min(max_context, budget_ctx))
        chunks: list[Chunk] = [(1, _log_uniform(rng, 2, top), True) for _ in range(n_dec)]
        if n_pre:
            for q in _split(rng, n_tok - n_dec, n_pre):
                prefix = 0 if rng.random() < 0.4 else _log_uniform(rng, 1, max(1, top - q))
                chunks.append((q, min(q + prefix, max(q, top)), False))
        add(chunks)
    return points


def profile_grid(buckets: BucketConfig, points_per_bucket: int, *, max_context: int,
                 max_kv_tokens: int, page_size: int, seed: int = 0) -> list[GridPoint]:
    """Every bucket's grid, interleaved round-robin (see the module docstring)."""
    grids = [bucket_grid(buckets, b, points_per_bucket, max_context=max_context,
                         max_kv_tokens=max_kv_tokens, page_size=page_size, seed=seed)
             for b in buckets.pairs()]
    out = []
    for i in range(max((len(g) for g in grids), default=0)):
        out += [g[i] for g in grids if i < len(g)]
    return out


# ----- measuring ----------------------------------------------------------------------------

STATISTICS = ("min", "median")
MIN_POINTS = 3  # per bucket, for a fit (fit_profile's default)


@dataclasses.dataclass
class Measurement:
    point: GridPoint
    samples: list[float]
    statistic: str = "min"

    @property
    def seconds(self) -> float:
        """The point's time: the minimum of its repeats by default. On a shared machine
        interference (other processes, a GC pause) only ever adds time, so the fastest
        of a few spread-out runs is the device's own cost and the most repeatable
        figure; a sustained slowdown is what the engine's online correction is for."""
        if self.statistic == "min":
            return min(self.samples)
        return float(statistics.median(self.samples))


def make_plan(engine, point: GridPoint):
    """A StepPlan of placeholder requests with ``point``'s contents; their KV pages are
    allocated from the engine's pool (free them with ``release_plan``)."""
    from fbjax.sched.base import ScheduledChunk, StepPlan
    from fbjax.sched.request import Request, SamplingParams

    greedy = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    chunks = []
    for i, (q, kv, is_decode) in enumerate(point.chunks):
        rid = f"profile-{i}"
        if is_decode:
            request = Request(rid, [65] * (kv - 1), greedy, 0.0)
            request.append_output(66, 0.0)
        else:
            request = Request(rid, [65] * kv, greedy, 0.0)
        if not engine.kv.ensure(rid, kv):
            release_plan(engine, chunks)
            raise ProfileError(f"grid point {point.chunks} does not fit the KV pool")
        chunks.append(ScheduledChunk(request, q, kv - q))
    return StepPlan(point.bucket, chunks)


def release_plan(engine, chunks) -> None:
    for c in chunks:
        engine.kv.free(c.request.request_id)


def time_step(engine, plan, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one runner call (the result is fetched, so the device work is done)."""
    from fbjax.engine.batch import build_batch

    batch = build_batch(plan, engine.kv, engine.runner.pages_per_seq)
    start = clock()
    engine.runner.run(batch)
    return clock() - start


def measure(engine, points: Sequence[GridPoint], *, warmup: int = 1, repeats: int = 3,
            statistic: str = "min", time_limit_s: float | None = None,
            progress: Callable[[int, int], None] | None = None,
            min_per_bucket: int = 0) -> list[Measurement]:
    """Time every point ``repeats`` times on the engine's executables, in ``repeats``
    passes over the whole grid (so one burst of interference hits one sample of many
    points rather than every sample of one), after ``warmup`` untimed runs of each
    point in the first pass. At the time limit it stops, keeping the points with at
    least one sample, except that the first pass goes on until every bucket has
    ``min_per_bucket`` points (so that a fit is possible however slow the steps are);
    ``progress(done, total)`` counts timed runs."""
    if statistic not in STATISTICS:
        raise ProfileError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if engine.scheduler.has_unfinished():
        raise ProfileError("profile an idle engine: it has requests in flight")
    start = time.monotonic()
    samples: list[list[float]] = [[] for _ in points]
    total = len(points) * repeats
    done = 0
    per_bucket: dict[Bucket, int] = {}
    for rep in range(repeats):
        for i, point in enumerate(points):
            if (time_limit_s is not None and time.monotonic() - start > time_limit_s
                    and (rep > 0 or per_bucket.get(point.bucket, 0) >= min_per_bucket)):
                continue
            if rep == 0:
                per_bucket[point.bucket] = per_bucket.get(point.bucket, 0) + 1
            plan = make_plan(engine, point)
            try:
                for _ in range(warmup if rep == 0 else 0):
                    time_step(engine, plan)
                samples[i].append(time_step(engine, plan))
            finally:
                release_plan(engine, plan.chunks)
            done += 1
            if progress is not None:
                progress(done, total)
    return [Measurement(p, s, statistic) for p, s in zip(points, samples, strict=True) if s]


def fit_profile(measurements: Sequence[Measurement], metadata: dict[str, Any], *,
                holdout_every: int = 5, min_points: int = MIN_POINTS,
                pooled: bool = False) -> LatencyModel:
    """The profile of ``measurements`` with its held-out error (``pooled``: shared
    slopes, see ``LatencyModel.fit``)."""
    counts: dict[Bucket, int] = {}
    for m in measurements:
        counts[m.point.bucket] = counts.get(m.point.bucket, 0) + 1
    wanted = [tuple(b) for b in metadata.get("buckets_profiled", counts)]
    short = [b for b in wanted if counts.get(b, 0) < min_points]
    if short:
        raise ProfileError(f"too few measurements for buckets {short[:4]} (need {min_points} "
                           "each): raise --time_limit_s or lower --points_per_bucket")
    points = [(m.point.bucket, m.point.features, m.seconds) for m in measurements]
    # Held-out error of what is shipped (fit + lift), on the split LatencyModel.fit uses:
    # every ``holdout_every``-th point of each bucket (index 2 mod holdout_every).
    seen: dict[Bucket, int] = {}
    train, held = [], []
    for point in points:
        i = seen[point[0]] = seen.get(point[0], -1) + 1
        (held if holdout_every > 0 and counts[point[0]] >= 3 and i % holdout_every == 2
         else train).append(point)
    model = monotone_lift(LatencyModel.fit(points, holdout_every=0, metadata=metadata,
                                           pooled=pooled))
    if held:
        probe = monotone_lift(LatencyModel.fit(train, holdout_every=0, pooled=pooled))
        model.heldout = probe.error_on(held)
    if model.heldout is not None:
        model.metadata["heldout_mape"] = model.heldout.mape
        model.metadata["heldout_p95_abs_ms"] = model.heldout.p95_abs_ms
    return model


def monotone_lift(model: LatencyModel) -> LatencyModel:
    """Raise bucket intercepts where noise made a step one unit bigger predict less than
    the step below it across a bucket boundary (within a bucket NNLS already makes
    predictions monotone), along the paths the engine takes: one fresh prompt chunk
    growing past a token bucket, and decodes growing past a seq bucket, each on the
    bucket ``BucketConfig.pick`` gives it. Lifts are recorded in the metadata
    (``monotone_lift_ms``); the held-out error ``fit_profile`` reports is that of the
    lifted model."""
    coef = {b: c.copy() for b, c in model.coefficients.items()}
    try:
        ladder = BucketConfig(tuple(sorted({t for t, _ in coef})),
                              tuple(sorted({s for _, s in coef})))
    except ValueError:
        return model

    def predict(chunks) -> tuple[Bucket, float]:
        f = StepFeatures.of_chunks(chunks)
        bucket = ladder.pick(f.num_tokens, f.num_seqs)
        return bucket, float(coef[bucket] @ f.vector()) if bucket in coef else math.inf

    paths = [[(n, n, False)] for n in ladder.token_buckets]
    paths += [[(1, 2, True)] * n for n in ladder.seq_buckets]
    lifts: dict[str, float] = {}
    for chunks in sorted(paths, key=len):
        q, kv, is_decode = chunks[0]
        bigger = [(q + 1, kv + 1, False)] if not is_decode else chunks + [(1, 2, True)]
        f = StepFeatures.of_chunks(bigger)
        if f.num_tokens > ladder.max_tokens or f.num_seqs > ladder.max_seqs:
            continue
        (_, before), (bucket, after) = predict(chunks), predict(bigger)
        if bucket in coef and after < before:
            coef[bucket][0] += before - after
            key = f"{bucket[0]}x{bucket[1]}"
            lifts[key] = round(lifts.get(key, 0.0) + (before - after) * 1e3, 4)
    metadata = dict(model.metadata, monotone_lift_ms=lifts)
    return LatencyModel(coef, metadata=metadata, heldout=model.heldout)


@dataclasses.dataclass(frozen=True)
class GridSettings:
    """How much to measure: the CLI's defaults are thorough; the engine's automatic
    profile at start-up (``AUTO``) is sized to fit its time limit on a small CPU."""

    points_per_bucket: int = 24
    warmup: int = 1
    repeats: int = 5
    statistic: str = "min"
    time_limit_s: float | None = None
    seed: int = 0
    pooled: bool = False  # shared slopes (LatencyModel.fit): for few points per bucket


# Sized for ~29 buckets of a small real model on 2 cores (steps of 0.1-0.6 s): the first
# run of each executable is slow, so no warm-up but the minimum of 2 timed runs.
AUTO = GridSettings(points_per_bucket=4, warmup=0, repeats=2, time_limit_s=50.0,
                    pooled=True)


@dataclasses.dataclass
class Recording:
    model: LatencyModel
    measurements: list[Measurement]
    planned: int
    seconds: float


def record_profile(engine, settings: GridSettings, source: str,
                   show_progress: bool = True) -> Recording:
    """Measure ``engine``'s compiled buckets over the grid ``settings`` describes (with a
    progress bar of timed runs on stderr) and fit its latency profile (metadata:
    provenance, grid, held-out error). The one path both ``python -m fbjax.profile`` and
    the engine's automatic profile take."""
    config = engine.config
    points = profile_grid(config.buckets, settings.points_per_bucket,
                          max_context=engine.max_model_len - 1,
                          max_kv_tokens=engine.kv.capacity_tokens,
                          page_size=engine.kv.page_size, seed=settings.seed)
    start = time.monotonic()
    with tqdm(total=len(points) * settings.repeats, desc="measuring step times", unit="run",
              file=sys.stderr, disable=not show_progress) as bar:
        measurements = measure(engine, points, warmup=settings.warmup,
                               repeats=settings.repeats, statistic=settings.statistic,
                               time_limit_s=settings.time_limit_s,
                               progress=lambda done, total: bar.update(done - bar.n),
                               min_per_bucket=MIN_POINTS)
    elapsed = time.monotonic() - start
    meta = engine_metadata(engine)
    meta["source"] = source
    meta["grid"] = {"points_per_bucket": settings.points_per_bucket,
                    "measured": len(measurements), "planned": len(points),
                    "warmup": settings.warmup, "repeats": settings.repeats,
                    "seed": settings.seed, "statistic": f"{settings.statistic} of repeats",
                    "seconds": round(elapsed, 1), "time_limit_s": settings.time_limit_s,
                    "pooled_fit": settings.pooled}
    meta["buckets_profiled"] = [list(b) for b in config.buckets.pairs()]
    return Recording(fit_profile(measurements, meta, pooled=settings.pooled), measurements,
                     len(points), elapsed)


def engine_metadata(engine) -> dict[str, Any]:
    """Provenance of a profile measured on ``engine`` (see ``ENGINE_METADATA``)."""
    import jax
    import jaxlib
    from fbjax_kernels.ragged_paged_attention import resolve_impl

    config = engine.config
    mc = engine.model_config
    return {
        "source": "python -m fbjax.profile",
        "device": current_device_key(),
        "device_detail": device_detail(),
        "model": model_key(config.model),
        "model_shape": {k: getattr(mc, k) for k in (
            "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
            "head_dim", "vocab_size")},
        "dtype": config.dtype,
        "attention_impl": resolve_impl(config.attention_impl),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "token_buckets": list(config.buckets.token_buckets),
        "seq_buckets": list(config.buckets.seq_buckets),
        "kv_capacity_tokens": config.cache.num_pages * config.cache.page_size,
        "page_size": config.cache.page_size,
        "max_model_len": engine.max_model_len,
        "units": "seconds",
        "features": list(FEATURES),
        "format": FORMAT,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }


def plot_profile(model: LatencyModel, measurements: Sequence[Measurement], path: str,
                 title: str) -> None:
    """Predicted vs measured, one small panel per bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_bucket: dict[Bucket, list[tuple[float, float]]] = {}
    for m in measurements:
        by_bucket.setdefault(m.point.bucket, []).append(
            (m.seconds * 1e3, model.predict(m.point.bucket, m.point.features) * 1e3))
    keys = sorted(by_bucket)
    cols = min(6, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, bucket in zip(axes.flat, keys, strict=False):
        pairs = by_bucket[bucket]
        x = [p[0] for p in pairs]
        y = [p[1] for p in pairs]
        hi = max(x + y) * 1.05
        lo = min(x + y) * 0.95
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.scatter(x, y, s=8)
        ax.set_title(f"{bucket[0]} tok x {bucket[1]} seq", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.supxlabel("measured step time (ms)")
    fig.supylabel("predicted (ms)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
