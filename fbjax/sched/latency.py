"""LatencyModel: how long a step plan takes on a bucket, learned per bucket.

A step's cost is dominated by its bucket (the padded linear layers cost the same for
any contents) plus the work that does depend on contents: attention over each
sequence's context and the KV bytes it reads. So each bucket gets its own small
linear model over ``FEATURES`` of the plan, fitted by non-negative least squares:
non-negative coefficients keep predictions monotone in work, which the schedulers
rely on when they grow a step until it hits a time budget.

The same object serves three users: schedulers ask ``predict`` while forming a step,
the simulator uses it as the step time, and the engine feeds measured times back with
``update`` (online refinement: a per-bucket multiplicative correction, an exponential
moving average of measured/predicted that ignores outliers such as a GC pause).

Outliers are judged robustly: each bucket keeps its last ``window`` log ratios of
measured to profiled time, and a new one is rejected when it lies more than
``mad_k`` scaled median absolute deviations from their median (before the window holds
``min_window`` samples, when it is ``outlier_ratio`` times off the current correction
either way). Why not a fixed ratio alone: step times on a shared CPU are heavy-tailed
(a GC pause, another process on the core), and a fixed 3x gate lets a 2.5x hiccup move
the correction; the MAD gate tightens itself to each bucket's actual noise. Every
sample enters the window, accepted or not, so one GC pause never moves the model while
a lasting change (the machine got slower, another tenant arrived) becomes the window's
median after ``window / 2`` steps and is then learned.

Pure Python + numpy; saved as JSON with its provenance and held-out error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fbjax-latency-v1"

# What a step does, summed over its chunks. kv_len counts the chunk's own tokens.
FEATURES = ("intercept", "prefill_tokens", "num_decodes", "attn_qk", "kv_read", "max_kv")


@dataclasses.dataclass
class StepFeatures:
    """Additive summary of a step's contents; ``add`` one chunk at a time."""

    prefill_tokens: int = 0
    num_decodes: int = 0
    num_tokens: int = 0
    num_seqs: int = 0
    attn_qk: float = 0.0  # sum of q_len * kv_len: prefill attention FLOPs
    kv_read: int = 0  # sum of kv_len: KV bytes read
    max_kv: int = 0  # longest context: the reference kernels loop over it

    def add(self, q_len: int, kv_len: int, is_decode: bool) -> None:
        if is_decode:
            self.num_decodes += 1
        else:
            self.prefill_tokens += q_len
        self.num_tokens += q_len
        self.num_seqs += 1
        self.attn_qk += q_len * kv_len
        self.kv_read += kv_len
        self.max_kv = max(self.max_kv, kv_len)

    def with_chunk(self, q_len: int, kv_len: int, is_decode: bool) -> StepFeatures:
        out = StepFeatures(self.prefill_tokens, self.num_decodes, self.num_tokens,
                           self.num_seqs, self.attn_qk, self.kv_read, self.max_kv)
        out.add(q_len, kv_len, is_decode)
        return out

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.prefill_tokens, self.num_decodes, self.attn_qk / 1e3,
                         self.kv_read / 1e3, self.max_kv / 1e3])

    @classmethod
    def of_chunks(cls, chunks: Iterable[tuple[int, int, bool]]) -> StepFeatures:
        out = cls()
        for q_len, kv_len, is_decode in chunks:
            out.add(q_len, kv_len, is_decode)
        return out


# StepFeatures.vector divides the last three features by 1e3 (keeps NNLS well scaled).
_VECTOR_SCALE = (1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3)

Bucket = tuple[int, int]  # (tokens, seqs)


def _bucket_key(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def _parse_bucket(key: str) -> Bucket:
    tokens, seqs = key.split("x")
    return int(tokens), int(seqs)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """Non-negative least squares by the Lawson-Hanson active-set method."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12:
            break
        j = np.argmax(np.where(~passive, w, -np.inf))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
        w = a.T @ (b - a @ x)
    return x


@dataclasses.dataclass
class FitError:
    mape: float  # mean absolute percentage error, 0.05 = 5 %
    p95_abs_ms: float
    num_points: int


class LatencyModel:
    """Per-bucket linear models over ``FEATURES``; predictions in seconds."""

    def __init__(self, coefficients: dict[Bucket, np.ndarray], *,
                 metadata: dict[str, Any] | None = None,
                 heldout: FitError | None = None, ema: float = 0.1,
                 outlier_ratio: float = 3.0, window: int = 32, min_window: int = 8,
                 mad_k: float = 4.0, min_spread: float = 0.05) -> None:
        if not coefficients:
            raise ValueError("a latency model needs at least one bucket")
        self.coefficients = {b: np.asarray(c, float) for b, c in coefficients.items()}
        # The same coefficients with the feature scaling of StepFeatures.vector folded in.
        self._fast = {b: tuple(float(x) * s for x, s in zip(c, _VECTOR_SCALE, strict=True))
                      for b, c in self.coefficients.items()}
        self.metadata = dict(metadata or {})
        self.heldout = heldout
        self.correction = {b: 1.0 for b in self.coefficients}
        self.ema = ema
        self.outlier_ratio = outlier_ratio
        self.window = window
        self.min_window = min_window
        self.mad_k = mad_k
        self.min_spread = min_spread  # floor of the log-ratio spread (0.05: about 5 %)
        self._recent: dict[Bucket, deque[float]] = {}
        self.num_outliers = 0
        self.num_updates = 0

    @property
    def buckets(self) -> list[Bucket]:
        return sorted(self.coefficients)

    def predict(self, bucket: Bucket, features: StepFeatures) -> float:
        """Seconds for a step with ``features`` on ``bucket``."""
        try:
            c = self._fast[bucket]
        except KeyError:
            raise KeyError(f"latency model has no bucket {bucket}; it has {self.buckets}") \
                from None
        f = features  # plain float arithmetic: this runs for every candidate chunk
        return (c[0] + c[1] * f.prefill_tokens + c[2] * f.num_decodes + c[3] * f.attn_qk
                + c[4] * f.kv_read + c[5] * f.max_kv) * self.correction[bucket]

    # ----- fitting ------------------------------------------------------------------
    @classmethod
    def fit(cls, points: Sequence[tuple[Bucket, StepFeatures, float]], *,
            holdout_every: int = 5, metadata: dict[str, Any] | None = None,
            pooled: bool = False) -> LatencyModel:
        """Fit each bucket by NNLS on all but every ``holdout_every``-th point, report the
        error on those, then refit on everything (the reported error stays honest).

        ``pooled``: one NNLS over every bucket, with a per-bucket intercept (the padded
        linear layers) and content slopes shared by all buckets (attention and KV reads
        cost the same per unit whatever the padding). For a few points per bucket, as
        in the engine's automatic profile, where a separate fit of six coefficients to
        three points would extrapolate wildly."""
        fit_all = _fit_pooled if pooled else _fit_each
        by_bucket: dict[Bucket, list[tuple[StepFeatures, float]]] = {}
        for bucket, feats, seconds in points:
            by_bucket.setdefault(bucket, []).append((feats, seconds))
        train: dict[Bucket, list[tuple[StepFeatures, float]]] = {}
        held: list[tuple[Bucket, StepFeatures, float]] = []
        for bucket, rows in by_bucket.items():
            can_hold = holdout_every > 0 and len(rows) >= 3
            is_held = [can_hold and i % holdout_every == 2 for i in range(len(rows))]
            held += [(bucket, f, s) for (f, s), h in zip(rows, is_held, strict=True) if h]
            train[bucket] = [r for r, h in zip(rows, is_held, strict=True) if not h]
        heldout = None
        if held:
            probe = cls(fit_all(train))
            heldout = fit_errors([(probe.predict(b, f), s) for b, f, s in held])
        return cls(fit_all(by_bucket), metadata=metadata, heldout=heldout)

    def error_on(self, points: Sequence[tuple[Bucket, StepFeatures, float]]) -> FitError:
        return fit_errors([(self.predict(b, f), s) for b, f, s in points])

    # ----- online refinement --------------------------------------------------------
    def update(self, bucket: Bucket, features: StepFeatures, measured: float) -> bool:
        """Fold one measured step time into the bucket's correction; False if rejected
        as an outlier (see the module docstring) or nonsensical."""
        base = self.predict(bucket, features) / self.correction[bucket]
        if not (base > 0 and measured > 0 and math.isfinite(measured)):
            return False
        ratio = measured / base
        current = self.correction[bucket]
        log_ratio = math.log(ratio)
        recent = self._recent.get(bucket)
        if recent is None:
            recent = self._recent[bucket] = deque(maxlen=self.window)
        if len(recent) >= self.min_window:
            center = statistics.median(recent)
            mad = statistics.median(abs(x - center) for x in recent)
            outlier = abs(log_ratio - center) > self.mad_k * max(1.4826 * mad,
                                                                  self.min_spread)
        else:
            outlier = not 1 / self.outlier_ratio <= ratio / current <= self.outlier_ratio
        recent.append(log_ratio)
        if outlier:
            self.num_outliers += 1
            return False
        self.correction[bucket] = (1 - self.ema) * current + self.ema * ratio
        self.num_updates += 1
        return True

    # ----- persistence --------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": list(FEATURES),
            "metadata": self.metadata,
            "heldout": dataclasses.asdict(self.heldout) if self.heldout else None,
            "buckets": {_bucket_key(b): [float(x) for x in
                                         self.coefficients[b] * self.correction[b]]
                        for b in self.buckets},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "<json>") -> LatencyModel:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object at the top level")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not an fbjax latency profile "
                             f"(format {data.get('format')!r}, expected {FORMAT!r})")
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"{source}: features {data.get('features')} differ from "
                             f"{list(FEATURES)}")
        buckets = data.get("buckets")
        if not isinstance(buckets, dict) or not buckets:
            raise ValueError(f"{source}: 'buckets' must be a non-empty object")
        coefficients = {}
        for key, coef in buckets.items():
            try:
                bucket = _parse_bucket(key)
                if min(bucket) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{source}: bad bucket key {key!r} "
                                 "(expected 'TOKENSxSEQS')") from None
            if not isinstance(coef, list) or len(coef) != len(FEATURES) or any(
                    isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0
                    or not math.isfinite(c) for c in coef):
                raise ValueError(f"{source}: bucket {key} needs {len(FEATURES)} "
                                 "non-negative finite numbers")
            coefficients[bucket] = np.array(coef, float)
        held = data.get("heldout")
        try:
            heldout = FitError(**held) if held else None
        except TypeError:
            raise ValueError(f"{source}: 'heldout' must hold "
                             f"{[f.name for f in dataclasses.fields(FitError)]}") from None
        return cls(coefficients, metadata=data.get("metadata") or {}, heldout=heldout)

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"latency profile not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_json(data, str(path))


Rows = Sequence[tuple[StepFeatures, float]]


def _nnls_scaled(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Scale columns so the active-set tolerances mean the same for every feature.
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
    return nnls(a / scale, b) / scale


def _fit_rows(rows: Rows) -> np.ndarray:
    return _nnls_scaled(np.stack([f.vector() for f, _ in rows]),
                        np.array([s for _, s in rows]))


def _fit_each(by_bucket: dict[Bucket, Rows]) -> dict[Bucket, np.ndarray]:
    return {bucket: _fit_rows(rows) for bucket, rows in by_bucket.items()}


def _fit_pooled(by_bucket: dict[Bucket, Rows]) -> dict[Bucket, np.ndarray]:
    """Per-bucket intercepts and shared slopes (see ``LatencyModel.fit``)."""
    buckets = sorted(by_bucket)
    rows = [(i, f, s) for i, bucket in enumerate(buckets) for f, s in by_bucket[bucket]]
    a = np.zeros((len(rows), len(buckets) + len(FEATURES) - 1))
    for r, (i, f, _) in enumerate(rows):
        v = f.vector()
        a[r, i] = v[0]
        a[r, len(buckets):] = v[1:]
    x = _nnls_scaled(a, np.array([s for _, _, s in rows]))
    slopes = x[len(buckets):]
    return {bucket: np.concatenate([[x[i]], slopes]) for i, bucket in enumerate(buckets)}


def fit_errors(pairs: Sequence[tuple[float, float]]) -> FitError:
    pred = np.array([p for p, _ in pairs])
    true = np.array([t for _, t in pairs])
    ape = np.abs(pred - true) / np.maximum(true, 1e-12)
    return FitError(mape=float(ape.mean()),
                    p95_abs_ms=float(np.percentile(np.abs(pred - true), 95) * 1e3),
                    num_points=len(pairs))
