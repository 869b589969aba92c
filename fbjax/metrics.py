"""Serving metrics with vLLM ``benchmark_serving`` conventions, SLOs and capacity search.

Pure Python + NumPy (no JAX). Definitions (docs/architecture.md, "Metrics"):

* TTFT = first token time - arrival. TPOT = (last - first) / (n - 1), only for outputs of
  more than one token. ITL = each gap between consecutive tokens. E2EL = last token
  time - arrival. Records hold seconds; summaries print milliseconds, as vLLM does.
* A request meets its SLO when TTFT <= ttft_slo and TPOT <= tpot_slo (a one-token output
  is judged on TTFT only). Per-request SLOs override the global ones; a criterion with
  no SLO at all is not checked. A request that produced no token misses.
* Token-stall view (Sarathi-Serve's): with a ``tbt_slo``, a request also needs the 99th
  percentile of its own inter-token gaps within it (a one-token output passes).
* Envelope view (the paper's): token j (0-based) by ``arrival + ttft_slo + j * tpot_slo``;
  with ``anchor="first_token"`` decode deadlines are ``first + j * tpot_slo`` instead.
* SLO attainment = share of requests that meet it; goodput = those requests / duration.
* Capacity = the highest rate scale whose attainment stays >= target, by bisection.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

# Timestamps come from sums of float step times: allow this much slack (seconds) in SLO
# comparisons so that a TPOT of exactly the SLO is not failed by rounding.
SLO_EPS = 1e-9

ENVELOPE_ANCHORS = ("arrival", "first_token")


# ----------------------------------------------------------------------------- per request


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """Latencies of one request, in seconds. ``ttft``/``e2el`` are None without output."""

    arrival: float
    token_times: tuple[float, ...]
    prompt_len: int = 0
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    request_id: str = ""
    num_preemptions: int = 0

    @classmethod
    def from_times(cls, arrival: float, token_times: Sequence[float], prompt_len: int = 0,
                   ttft_slo: float | None = None, tpot_slo: float | None = None,
                   request_id: str = "", num_preemptions: int = 0) -> RequestMetrics:
        times = tuple(float(t) for t in token_times)
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"request {request_id!r}: token times are not non-decreasing")
        return cls(float(arrival), times, int(prompt_len), ttft_slo, tpot_slo, str(request_id),
                   int(num_preemptions))

    @classmethod
    def from_request(cls, request: Any) -> RequestMetrics:
        """From a :class:`fbjax.sched.request.Request` (finished or not)."""
        return cls.from_times(request.arrival_time, request.token_times, request.prompt_len,
                              request.ttft_slo, request.tpot_slo, request.request_id,
                              getattr(request, "num_preemptions", 0))

    @property
    def output_len(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        if n < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def itls(self) -> tuple[float, ...]:
        t = self.token_times
        return tuple(b - a for a, b in zip(t, t[1:], strict=False))

    @property
    def e2el(self) -> float | None:
        return self.token_times[-1] - self.arrival if self.token_times else None

    def _slos(self, ttft_slo: float | None, tpot_slo: float | None):
        return (self.ttft_slo if self.ttft_slo is not None else ttft_slo,
                self.tpot_slo if self.tpot_slo is not None else tpot_slo)

    def meets_ttft(self, ttft_slo: float | None = None) -> bool:
        slo = self.ttft_slo if self.ttft_slo is not None else ttft_slo
        if not self.token_times:
            return False
        return slo is None or self.ttft <= slo + SLO_EPS

    def meets_tpot(self, tpot_slo: float | None = None) -> bool:
        slo = self.tpot_slo if self.tpot_slo is not None else tpot_slo
        if not self.token_times:
            return False
        tpot = self.tpot
        return slo is None or tpot is None or tpot <= slo + SLO_EPS

    def meets_tbt(self, tbt_slo: float | None) -> bool:
        """P99 of this request's inter-token gaps <= ``tbt_slo`` (None: not checked)."""
        if not self.token_times:
            return False
        if tbt_slo is None or len(self.token_times) < 2:
            return True
        return float(np.percentile(np.diff(self.token_times), 99)) <= tbt_slo + SLO_EPS

    def meets_slo(self, ttft_slo: float | None = None, tpot_slo: float | None = None,
                  tbt_slo: float | None = None) -> bool:
        """vLLM view: TTFT <= slo and TPOT <= slo (per-request SLOs override these), and
        with ``tbt_slo`` the token-stall view too."""
        return (self.meets_ttft(ttft_slo) and self.meets_tpot(tpot_slo)
                and self.meets_tbt(tbt_slo))

    def meets_envelope(self, ttft_slo: float | None = None, tpot_slo: float | None = None,
                       anchor: str = "arrival") -> bool:
        """Paper view: token j by ``arrival + ttft_slo + j * tpot_slo`` (``anchor="arrival"``)
        or, after the first, by ``first_token + j * tpot_slo`` (``anchor="first_token"``)."""
        if anchor not in ENVELOPE_ANCHORS:
            raise ValueError(f"envelope anchor must be one of {ENVELOPE_ANCHORS}, got {anchor!r}")
        ttft_slo, tpot_slo = self._slos(ttft_slo, tpot_slo)
        if not self.token_times:
            return False
        if ttft_slo is not None and self.ttft > ttft_slo + SLO_EPS:
            return False
        if tpot_slo is None or len(self.token_times) < 2:
            return True
        t = np.asarray(self.token_times)
        j = np.arange(len(t))
        if anchor == "arrival":
            base = self.arrival + (ttft_slo if ttft_slo is not None else self.ttft)
        else:
            base = t[0]
        return bool(np.all(t[1:] <= base + j[1:] * tpot_slo + SLO_EPS))


def records_from_requests(requests: Iterable[Any]) -> list[RequestMetrics]:
    return [RequestMetrics.from_request(r) for r in requests]


def max_tbt_stall(records: Iterable[RequestMetrics]) -> float:
    """Largest gap between consecutive tokens of any request, in seconds (0.0 if none)."""
    return max((max(r.itls) for r in records if len(r.token_times) > 1), default=0.0)


# ----------------------------------------------------------------------------- summary


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Mean, median, std and percentiles of one latency, in milliseconds (nan if empty)."""

    mean_ms: float
    median_ms: float
    std_ms: float
    max_ms: float
    percentiles_ms: tuple[tuple[float, float], ...]
    count: int

    @classmethod
    def of(cls, values_s: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        if len(values_s) == 0:
            nan = math.nan
            return cls(nan, nan, nan, nan, tuple((float(p), nan) for p in percentiles), 0)
        ms = np.asarray(values_s, dtype=float) * 1000.0
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()), float(ms.max()),
                   tuple((float(p), float(np.percentile(ms, p))) for p in percentiles),
                   int(ms.size))

    def p(self, percentile: float) -> float:
        for q, v in self.percentiles_ms:
            if q == percentile:
                return v
        raise KeyError(f"percentile {percentile} was not computed "
                       f"(have {[q for q, _ in self.percentiles_ms]})")


@dataclasses.dataclass(frozen=True)
class BenchmarkSummary:
    """What vLLM's ``benchmark_serving`` prints, plus SLO attainment in both views.

    Attainments are shares in [0, 1] of all records (None when no SLO is set anywhere);
    goodput is SLO-meeting requests per second of ``duration_s``.
    """

    num_requests: int
    completed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    ttft_slo: float | None
    tpot_slo: float | None
    slo_attainment: float | None
    ttft_attainment: float | None
    tpot_attainment: float | None
    goodput: float | None
    envelope_attainment: float | None
    envelope_anchor: str
    max_tbt_stall_ms: float
    num_preemptions: int
    tbt_slo: float | None = None
    tbt_attainment: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict with vLLM's key names (``mean_ttft_ms``, ``p99_tpot_ms``...)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LatencyStats):
                out[f"mean_{f.name}_ms"] = v.mean_ms
                out[f"median_{f.name}_ms"] = v.median_ms
                out[f"std_{f.name}_ms"] = v.std_ms
                out[f"max_{f.name}_ms"] = v.max_ms
                for p, x in v.percentiles_ms:
                    out[f"p{p:g}_{f.name}_ms"] = x
            else:
                out[f.name] = v
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in out.items()}


def summarize(records: Sequence[RequestMetrics], duration_s: float,
              ttft_slo: float | None = None, tpot_slo: float | None = None,
              percentiles: Sequence[float] = (50, 90, 99),
              envelope_anchor: str = "arrival",
              tbt_slo: float | None = None) -> BenchmarkSummary:
    """Aggregate per-request records over a run of ``duration_s`` seconds.

    SLOs are in seconds (per-request ``ttft_slo``/``tpot_slo`` override these); a
    ``tbt_slo`` (P99 gap per request) joins the SLO when given.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    if envelope_anchor not in ENVELOPE_ANCHORS:
        raise ValueError(f"envelope anchor must be one of {ENVELOPE_ANCHORS}, "
                         f"got {envelope_anchor!r}")
    records = list(records)
    done = [r for r in records if r.token_times]
    in_tok = sum(r.prompt_len for r in done)
    out_tok = sum(r.output_len for r in done)
    itls = [g for r in done for g in r.itls]

    any_slo = (ttft_slo is not None or tpot_slo is not None or tbt_slo is not None
               or any(r.ttft_slo is not None or r.tpot_slo is not None for r in records))
    n = len(records)
    tbt_att = None
    if any_slo and n:
        meets = sum(r.meets_slo(ttft_slo, tpot_slo, tbt_slo) for r in records)
        if tbt_slo is not None:
            tbt_att = sum(r.meets_tbt(tbt_slo) for r in records) / n
        attain: float | None = meets / n
        ttft_att: float | None = sum(r.meets_ttft(ttft_slo) for r in records) / n
        tpot_att: float | None = sum(r.meets_tpot(tpot_slo) for r in records) / n
        goodput: float | None = meets / duration_s
        env: float | None = sum(r.meets_envelope(ttft_slo, tpot_slo, envelope_anchor)
                                for r in records) / n
    else:
        attain = ttft_att = tpot_att = goodput = env = None
    return BenchmarkSummary(
        num_requests=n,
        completed=len(done),
        duration_s=float(duration_s),
        total_input_tokens=in_tok,
        total_output_tokens=out_tok,
        request_throughput=len(done) / duration_s,
        output_throughput=out_tok / duration_s,
        total_token_throughput=(in_tok + out_tok) / duration_s,
        ttft=LatencyStats.of([r.ttft for r in done], percentiles),
        tpot=LatencyStats.of([r.tpot for r in done if r.tpot is not None], percentiles),
        itl=LatencyStats.of(itls, percentiles),
        e2el=LatencyStats.of([r.e2el for r in done], percentiles),
        ttft_slo=ttft_slo,
        tpot_slo=tpot_slo,
        slo_attainment=attain,
        ttft_attainment=ttft_att,
        tpot_attainment=tpot_att,
        goodput=goodput,
        envelope_attainment=env,
        envelope_anchor=envelope_anchor,
        max_tbt_stall_ms=max(itls, default=0.0) * 1000.0,
        num_preemptions=sum(r.num_preemptions for r in records),
        tbt_slo=tbt_slo,
        tbt_attainment=tbt_att,
    )


def _line(label: str, value: Any, fmt: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "n/a"
    elif isinstance(value, int):
        text = str(value)
    else:
        text = format(value, fmt)
    return f"{label:<40} {text:<10}"


def _rule(title: str, fill: str) -> str:
    return "{s:{c}^{n}}".format(s=title, n=50, c=fill)


def format_table(summary: BenchmarkSummary) -> str:
    """A text block laid out like vLLM's ``benchmark_serving`` result, plus SLO lines."""
    s = summary
    lines = [
        _rule(" Serving Benchmark Result ", "="),
        _line("Successful requests:", s.completed),
        _line("Benchmark duration (s):", s.duration_s),
        _line("Total input tokens:", s.total_input_tokens),
        _line("Total generated tokens:", s.total_output_tokens),
        _line("Request throughput (req/s):", s.request_throughput),
    ]
    if s.goodput is not None:
        lines.append(_line("Request goodput (req/s):", s.goodput))
    lines += [
        _line("Output token throughput (tok/s):", s.output_throughput),
        _line("Total Token throughput (tok/s):", s.total_token_throughput),
    ]
    sections = (("ttft", "TTFT", "Time to First Token"),
                ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                ("itl", "ITL", "Inter-token Latency"),
                ("e2el", "E2EL", "End-to-end Latency"))
    for attr, short, title in sections:
        st: LatencyStats = getattr(s, attr)
        lines.append(_rule(title, "-"))
        lines.append(_line(f"Mean {short} (ms):", st.mean_ms))
        lines.append(_line(f"Median {short} (ms):", st.median_ms))
        for p, v in st.percentiles_ms:
            lines.append(_line(f"P{p:g} {short} (ms):", v))
    if s.slo_attainment is not None:
        ttft = "-" if s.ttft_slo is None else f"{s.ttft_slo * 1000:g}ms"
        tpot = "-" if s.tpot_slo is None else f"{s.tpot_slo * 1000:g}ms"
        lines.append(_rule(f"SLO (ttft:{ttft} tpot:{tpot})", "-"))
        lines.append(_line("SLO attainment (%):", 100.0 * s.slo_attainment))
        lines.append(_line("TTFT attainment (%):", 100.0 * s.ttft_attainment))
        lines.append(_line("TPOT attainment (%):", 100.0 * s.tpot_attainment))
        lines.append(_line(f"Envelope attainment, {s.envelope_anchor} (%):",
                           100.0 * s.envelope_attainment))
    lines.append(_line("Max TBT stall (ms):", s.max_tbt_stall_ms))
    lines.append(_line("Preemptions:", s.num_preemptions))
    lines.append("=" * 50)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fairness


@dataclasses.dataclass(frozen=True)
class PrefillDecodeShare:
    """Step time split between prefill and decode tokens over contended steps.

    A step is contended when both prefill and decode work were waiting; its duration is
    split by token share. Shares are nan when no contended step had tokens.
    """

    prefill_s: float
    decode_s: float
    contended_steps: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def prefill_share(self) -> float:
        return self.prefill_s / self.total_s if self.total_s > 0 else math.nan

    @property
    def decode_share(self) -> float:
        return self.decode_s / self.total_s if self.total_s > 0 else math.nan


def prefill_decode_share(
        steps: Iterable[tuple[float, int, int, bool, bool]]) -> PrefillDecodeShare:
    """Steps are ``(duration, prefill_tokens, decode_tokens, waiting_prefill,
    waiting_decode)``; only steps with both kinds waiting count."""
    pre = dec = 0.0
    count = 0
    for duration, p, d, wait_p, wait_d in steps:
        if not (wait_p and wait_d) or p + d <= 0:
            continue
        count += 1
        pre += duration * p / (p + d)
        dec += duration * d / (p + d)
    return PrefillDecodeShare(pre, dec, count)


# ----------------------------------------------------------------------------- capacity


@dataclasses.dataclass(frozen=True)
class CapacityResult:
    """Outcome of :func:`capacity_search`.

    ``rate_scale`` is the highest scale evaluated with attainment >= target (0.0 if none);
    the true threshold lies in ``[rate_scale, upper)`` when ``converged``. ``saturated``
    means attainment never fell below target up to the expansion bound (capacity is at
    least ``rate_scale``). ``points`` are all ``(rate_scale, attainment)`` evaluated, sorted.
    """

    rate_scale: float
    attainment: float | None
    upper: float | None
    target: float
    converged: bool
    saturated: bool
    points: tuple[tuple[float, float], ...]


def capacity_search(attainment_at: Callable[[float], float], target: float = 0.99,
                    lo: float = 0.25, hi: float = 2.0, tol: float = 0.02,
                    max_iters: int = 20, growth: float = 2.0,
                    max_expansions: int = 8) -> CapacityResult:
    """Bisection for the highest rate scale with ``attainment_at(scale) >= target``.

    Assumes attainment falls with rate. If ``hi`` still meets the target, it grows by
    ``growth`` (at most ``max_expansions`` times); if ``lo`` misses, ``lo`` shrinks likewise.
    Bisection stops when ``upper - found <= tol * upper`` (relative) or after ``max_iters``
    evaluations.
    """
    if not 0 < lo < hi:
        raise ValueError(f"capacity search needs 0 < lo < hi, got lo={lo}, hi={hi}")
    if not growth > 1:
        raise ValueError(f"growth must be > 1, got {growth}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    seen: dict[float, float] = {}

    def f(x: float) -> float:
        if x not in seen:
            seen[x] = float(attainment_at(x))
        return seen[x]

    def result(found: float, upper: float | None, converged: bool, saturated: bool):
        return CapacityResult(found, seen.get(found), upper, target, converged, saturated,
                              tuple(sorted(seen.items())))

    # Bracket: good (meets target) < bad (misses).
    good: float | None = None
    bad: float | None = None
    if f(lo) >= target:
        good = lo
    else:
        bad = lo
        x = lo
        for _ in range(max_expansions):
            x /= growth
            if f(x) >= target:
                good = x
                break
            bad = x
        if good is None:
            return result(0.0, bad, False, False)
    if bad is None:
        x = hi
        for _ in range(max_expansions + 1):
            if f(x) < target:
                bad = x
                break
            good = x
            x *= growth
        if bad is None:
            return result(good, None, False, True)
    for _ in range(max_iters):
        if bad - good <= tol * bad:
            break
        mid = 0.5 * (good + bad)
        if f(mid) >= target:
            good = mid
        else:
            bad = mid
    return result(good, bad, bad - good <= tol * bad, False)
