"""Request traces: real LLM-serving traces and synthetic arrival processes.

Pure Python + NumPy (no JAX), shared by the simulator, the replay tool and benchmarks.

A :class:`Trace` is a list of :class:`TraceRequest` sorted by arrival, in seconds from the
start of the trace. Loaders:

* :func:`load_azure_csv` -- Azure LLM inference trace 2023 (``TIMESTAMP,ContextTokens,
  GeneratedTokens``; wall-clock timestamps with 7 fractional digits).
* :func:`load_mooncake_jsonl` -- Mooncake FAST'25 JSONL (``timestamp`` in ms, lengths,
  ``hash_ids`` of 512-token prefix blocks); optional jitter within quantized buckets.
* :func:`load_burstgpt_csv` -- BurstGPT CSV (``Timestamp`` in seconds, ``Request tokens``,
  ``Response tokens``).
* :func:`load_lengths_csv` -- lengths only (e.g. vidur's arXiv summarization stats) with
  synthetic Gamma arrivals, as vLLM's ``benchmark_serving`` makes them (burstiness 1 =
  Poisson).
* :func:`synthetic` -- fixed or uniform lengths with Gamma arrivals.
* :func:`load_trace` -- dispatch on the file's suffix and header; bare names such as
  ``"azure_llm_2023_conv"`` resolve against ``<shared>/data/traces/`` (see
  :mod:`fbjax.resources` for where ``<shared>`` is looked for).

Malformed input raises :class:`TraceError`, whose message names the file and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fbjax.resources import SharedDataNotFound, shared_dir

TRACES_SUBDIR = "data/traces"
AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
MOONCAKE_BLOCK_SIZE = 512  # tokens per hash_ids block in the Mooncake traces
TRACE_SUFFIXES = (".csv", ".jsonl")


class TraceError(ValueError):
    """A trace file is missing or malformed; the message names the file and the line."""


# ----------------------------------------------------------------------------- data types


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives and how long its prompt and output are.

    ``arrival_s`` counts seconds from the start of the trace. ``hash_ids`` are prefix-block
    hashes where the trace has them (Mooncake: 512-token blocks). ``line`` is the 1-based
    line of the source file the request came from (0 for synthetic requests).
    """

    arrival_s: float
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    line: int = 0


@dataclasses.dataclass
class Trace:
    """A named list of requests sorted by arrival time (stable: ties keep file order).
    ``hash_block_size``: tokens per block of the requests' ``hash_ids``."""

    name: str
    requests: list[TraceRequest]
    hash_block_size: int = MOONCAKE_BLOCK_SIZE

    def __post_init__(self) -> None:
        self.requests = sorted(self.requests, key=lambda r: r.arrival_s)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    def __getitem__(self, index):
        return self.requests[index]

    @property
    def arrivals(self) -> np.ndarray:
        return np.fromiter((r.arrival_s for r in self.requests), float, len(self.requests))

    @property
    def prompt_lens(self) -> np.ndarray:
        return np.fromiter((r.prompt_len for r in self.requests), np.int64, len(self.requests))

    @property
    def output_lens(self) -> np.ndarray:
        return np.fromiter((r.output_len for r in self.requests), np.int64, len(self.requests))

    @property
    def duration_s(self) -> float:
        """Last arrival minus first arrival (0.0 for fewer than two requests)."""
        if len(self.requests) < 2:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def mean_rate(self) -> float:
        """Requests per second: ``len / duration_s`` (``inf`` when all arrive at once)."""
        if not self.requests:
            return 0.0
        duration = self.duration_s
        return len(self.requests) / duration if duration > 0 else math.inf

    def scaled(self, rate_scale: float) -> Trace:
        """The same requests with arrival times divided by ``rate_scale`` (rate x scale)."""
        if not rate_scale > 0 or math.isinf(rate_scale):
            raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale!r}")
        reqs = [dataclasses.replace(r, arrival_s=r.arrival_s / rate_scale)
                for r in self.requests]
        return Trace(f"{self.name}@x{rate_scale:g}", reqs, self.hash_block_size)

    def with_gamma_arrivals(self, burstiness: float, seed: int = 0) -> Trace:
        """The same requests, in order, at the same mean rate, with Gamma inter-arrivals
        of shape ``burstiness`` (``gamma_arrivals``): the trace's lengths under
        arrivals it never had, so a policy is not judged on one trace's bursts only."""
        if len(self.requests) < 2 or math.isinf(self.mean_rate):
            raise ValueError("Gamma arrivals need a trace of two or more requests spread "
                             "over time")
        start = self.requests[0].arrival_s
        times = start + gamma_arrivals(len(self.requests), self.mean_rate, burstiness, seed)
        reqs = [dataclasses.replace(r, arrival_s=float(t))
                for r, t in zip(self.requests, times, strict=True)]
        return Trace(f"{self.name}@gamma{burstiness:g}", reqs, self.hash_block_size)

    def sliced(self, start_s: float, end_s: float | None = None) -> Trace:
        """Requests arriving in ``[start_s, end_s)``, with times re-based so start_s is 0."""
        if end_s is not None and end_s < start_s:
            raise ValueError(f"slice end {end_s} is before its start {start_s}")
        reqs = [dataclasses.replace(r, arrival_s=r.arrival_s - start_s) for r in self.requests
                if r.arrival_s >= start_s and (end_s is None or r.arrival_s < end_s)]
        end = "" if end_s is None else f"{end_s:g}"
        return Trace(f"{self.name}[{start_s:g}:{end}]", reqs, self.hash_block_size)

    def head(self, n: int) -> Trace:
        """The first ``n`` requests by arrival."""
        if n < 0:
            raise ValueError(f"head(n) needs n >= 0, got {n}")
        return Trace(f"{self.name}[:{n}]", self.requests[:n], self.hash_block_size)

    def to_requests(self, *, ttft_slo: float | None = None, tpot_slo: float | None = None,
                    id_prefix: str = "") -> list[Any]:
        """Simulator-ready :class:`fbjax.sched.request.Request` objects (lengths only).

        Each request ignores EOS and generates exactly ``output_len`` tokens (at least 1).
        """
        from fbjax.sched.request import Request, SamplingParams

        return [Request(f"{id_prefix}{i}", [], SamplingParams(max_tokens=max(1, r.output_len),
                                                              ignore_eos=True),
                        r.arrival_s, prompt_len=r.prompt_len, ttft_slo=ttft_slo,
                        tpot_slo=tpot_slo)
                for i, r in enumerate(self.requests)]

    def summary(self) -> dict[str, float]:
        """Row count, span, mean rate and mean lengths (for logs and reports)."""
        return {"requests": len(self), "duration_s": self.duration_s,
                "mean_rate": self.mean_rate,
                "mean_prompt_len": float(self.prompt_lens.mean()) if len(self) else 0.0,
                "mean_output_len": float(self.output_lens.mean()) if len(self) else 0.0}


# ----------------------------------------------------------------------------- helpers


def traces_dir() -> Path:
    """``<shared>/data/traces`` (see :mod:`fbjax.resources`); raises
    :class:`~fbjax.resources.SharedDataNotFound` saying where it looked."""
    return shared_dir(TRACES_SUBDIR) / TRACES_SUBDIR


def available_traces() -> list[str]:
    """Names (file stems) of the trace files in the shared traces directory; none when
    there is no shared data."""
    try:
        d = traces_dir()
    except SharedDataNotFound:
        return []
    return sorted(p.stem for p in d.iterdir() if p.suffix in TRACE_SUFFIXES)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"trace file not found: {path}") from None
    except IsADirectoryError:
        raise TraceError(f"trace path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _count(value: Any, what: str, where: str, minimum: int) -> int:
    """A token count: an integer (``"12"``, ``12`` or ``12.0``) that is >= minimum."""
    if isinstance(value, bool):
        raise TraceError(f"{where}: {what} must be an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            n = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise TraceError(f"{where}: {what} must be an integer, got {value!r}") from None
            if not f.is_integer():
                raise TraceError(f"{where}: {what} must be an integer, got {value!r}") from None
            n = int(f)
    elif isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    else:
        raise TraceError(f"{where}: {what} must be an integer, got {value!r}")
    if n < minimum:
        qual = "negative" if n < 0 else "too small"
        raise TraceError(f"{where}: {what} is {qual} ({n}); it must be >= {minimum}")
    return n


def _finish(name: str, path: Path, requests: list[TraceRequest]) -> Trace:
    if not requests:
        raise TraceError(f"{path}: the trace holds no requests")
    return Trace(name, requests)


def _csv_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, list[str]]]]:
    """Header and ``(line number, fields)`` for each non-blank data row."""
    lines = _read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise TraceError(f"{path}: empty file (no CSV header)")
    header = [h.strip() for h in next(csv.reader([lines[0]]))]

    def rows():
        for lineno, text in enumerate(lines[1:], start=2):
            if not text.strip():
                continue
            fields = next(csv.reader([text]))
            if len(fields) != len(header):
                raise TraceError(f"{path}:{lineno}: expected {len(header)} columns "
                                 f"({','.join(header)}), got {len(fields)}")
            yield lineno, fields

    return header, rows()


def _column(header: Sequence[str], name: str, path: Path) -> int:
    try:
        return list(header).index(name)
    except ValueError:
        raise TraceError(f"{path}: no column {name!r}; the header has "
                         f"{', '.join(header)}") from None


# ----------------------------------------------------------------------------- Azure

_AZURE_TS = re.compile(r"^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?$")
_EPOCH = _dt.datetime(1970, 1, 1)


def parse_timestamp_ns(text: str) -> int:
    """``2023-11-16 18:17:03.9799600`` -> integer nanoseconds since 1970 (no time zone).

    Up to 9 fractional digits (``strptime``'s ``%f`` takes at most 6). Raises ValueError.
    """
    m = _AZURE_TS.match(text.strip())
    if m is None:
        raise ValueError(f"not a timestamp like 2023-11-16 18:17:03.9799600: {text!r}")
    whole = _dt.datetime.strptime(m.group(1).replace("T", " "), "%Y-%m-%d %H:%M:%S")
    delta = whole - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    frac = (m.group(2) or "").ljust(9, "0")
    return seconds * 1_000_000_000 + int(frac)


def load_azure_csv(path: str | Path, name: str | None = None) -> Trace:
    """Azure LLM inference trace 2023: arrivals relative to the first row."""
    path = Path(path)
    header, rows = _csv_rows(path)
    if tuple(header) != AZURE_HEADER:
        raise TraceError(f"{path}:1: expected the Azure header {','.join(AZURE_HEADER)}, "
                         f"got {','.join(header)}")
    stamps: list[int] = []
    reqs: list[tuple[int, int, int]] = []
    for lineno, (ts, ctx, gen) in rows:
        where = f"{path}:{lineno}"
        try:
            stamps.append(parse_timestamp_ns(ts))
        except ValueError as e:
            raise TraceError(f"{where}: bad TIMESTAMP: {e}") from None
        reqs.append((lineno, _count(ctx, "ContextTokens", where, 1),
                     _count(gen, "GeneratedTokens", where, 0)))
    if not reqs:
        raise TraceError(f"{path}: the trace holds no requests")
    t0 = stamps[0]
    out = [TraceRequest((t - t0) / 1e9, p, o, line=ln)
           for t, (ln, p, o) in zip(stamps, reqs, strict=True)]
    if any(r.arrival_s < 0 for r in out):
        bad = next(r for r in out if r.arrival_s < 0)
        raise TraceError(f"{path}:{bad.line}: timestamp earlier than the first row's "
                         "(rows must be sorted by time)")
    return _finish(name or path.stem, path, out)


# ----------------------------------------------------------------------------- Mooncake


def load_mooncake_jsonl(path: str | Path, jitter_s: float = 0.0, seed: int = 0,
                        name: str | None = None) -> Trace:
    """Mooncake FAST'25 JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``,
    ``hash_ids`` (512-token blocks).

    The conversation trace's timestamps are quantized (~3 s buckets, many identical):
    ``jitter_s > 0`` adds a seeded uniform offset in ``[0, jitter_s)`` to each arrival,
    then re-sorts, so a bucket becomes a spread of arrivals instead of one burst.
    """
    path = Path(path)
    if jitter_s < 0 or not math.isfinite(jitter_s):
        raise ValueError(f"jitter_s must be finite and >= 0, got {jitter_s!r}")
    out: list[TraceRequest] = []
    for lineno, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: bad JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in obj:
                raise TraceError(f"{where}: missing key {key!r}")
        ts = obj["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise TraceError(f"{where}: timestamp must be a number of milliseconds, got {ts!r}")
        if ts < 0:
            raise TraceError(f"{where}: timestamp is negative ({ts})")
        hashes = obj.get("hash_ids", [])
        if not isinstance(hashes, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hashes):
            raise TraceError(f"{where}: hash_ids must be a list of integers")
        out.append(TraceRequest(ts / 1000.0, _count(obj["input_length"], "input_length", where, 1),
                                _count(obj["output_length"], "output_length", where, 0),
                                tuple(hashes), lineno))
    if jitter_s > 0 and out:
        offsets = np.random.default_rng(seed).uniform(0.0, jitter_s, len(out))
        out = [dataclasses.replace(r, arrival_s=r.arrival_s + float(d))
               for r, d in zip(out, offsets, strict=True)]
    return _finish(name or path.stem, path, out)


# ----------------------------------------------------------------------------- BurstGPT


def load_burstgpt_csv(path: str | Path, model: str | None = None, skip_failed: bool = True,
                      name: str | None = None) -> Trace:
    """BurstGPT CSV (``Timestamp`` seconds, ``Model``, ``Request tokens``, ``Response tokens``).

    ``model`` keeps only rows of that model; ``skip_failed`` drops rows with 0 response
    tokens (failed requests in BurstGPT). Arrivals are relative to the first kept row.
    """
    path = Path(path)
    header, rows = _csv_rows(path)
    i_ts, i_in, i_out = (_column(header, c, path) for c in BURSTGPT_COLUMNS)
    i_model = _column(header, "Model", path) if model is not None else -1
    out: list[TraceRequest] = []
    for lineno, fields in rows:
        where = f"{path}:{lineno}"
        if model is not None and fields[i_model].strip() != model:
            continue
        try:
            ts = float(fields[i_ts])
        except ValueError:
            raise TraceError(f"{where}: bad Timestamp {fields[i_ts]!r}") from None
        if not math.isfinite(ts) or ts < 0:
            raise TraceError(f"{where}: bad Timestamp {fields[i_ts]!r}")
        n_out = _count(fields[i_out], "Response tokens", where, 0)
        n_in = _count(fields[i_in], "Request tokens", where, 0)
        if skip_failed and (n_out == 0 or n_in == 0):
            continue
        if n_in == 0:
            raise TraceError(f"{where}: Request tokens is 0")
        out.append(TraceRequest(ts, n_in, n_out, line=lineno))
    if out:
        t0 = min(r.arrival_s for r in out)
        out = [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in out]
    return _finish(name or path.stem, path, out)


# ----------------------------------------------------------------------------- synthetic


def gamma_arrivals(num_requests: int, rate: float, burstiness: float = 1.0,
                   seed: int = 0) -> np.ndarray:
    """Arrival times (s) with Gamma inter-arrivals: shape ``burstiness``, mean ``1/rate``.

    As vLLM's ``benchmark_serving``: the first request arrives at 0, and each later one
    after a Gamma(shape=burstiness, scale=1/(rate*burstiness)) gap. burstiness 1 is
    Poisson; lower is burstier (CV = 1/sqrt(burstiness)). ``rate=inf`` sends all at 0.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
    if not burstiness > 0 or not math.isfinite(burstiness):
        raise ValueError(f"burstiness must be a positive finite number, got {burstiness!r}")
    if math.isinf(rate) or num_requests == 0:
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _lengths(spec: int | tuple[int, int], n: int, rng: np.random.Generator, what: str,
             minimum: int) -> np.ndarray:
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"{what} must be an int or a (lo, hi) pair, got {spec!r}")
        lo, hi = int(spec[0]), int(spec[1])
        if lo < minimum or hi < lo:
            raise ValueError(f"{what} range must satisfy {minimum} <= lo <= hi, got {spec!r}")
        return rng.integers(lo, hi, size=n, endpoint=True)
    if int(spec) < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {spec!r}")
    return np.full(n, int(spec), dtype=np.int64)


def synthetic(num_requests: int, rate: float, prompt_len: int | tuple[int, int],
              output_len: int | tuple[int, int], burstiness: float = 1.0, seed: int = 0,
              name: str | None = None) -> Trace:
    """Gamma arrivals with fixed lengths, or lengths uniform in ``[lo, hi]`` (inclusive)."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    arrivals = gamma_arrivals(num_requests, rate, burstiness, seed)
    rng = np.random.default_rng([seed, 1])
    prompts = _lengths(prompt_len, num_requests, rng, "prompt_len", 1)
    outputs = _lengths(output_len, num_requests, rng, "output_len", 1)
    reqs = [TraceRequest(float(a), int(p), int(o))
            for a, p, o in zip(arrivals, prompts, outputs, strict=True)]
    return Trace(name or f"synthetic-r{rate:g}-b{burstiness:g}-s{seed}", reqs)


def load_lengths_csv(path: str | Path, rate: float, burstiness: float = 1.0, seed: int = 0,
                     prompt_col: str = "num_prefill_tokens",
                     output_col: str = "num_decode_tokens", name: str | None = None) -> Trace:
    """A length-only CSV (e.g. vidur's arXiv summarization stats) with synthetic arrivals.

    Rows keep file order; arrivals come from :func:`gamma_arrivals` (``rate`` req/s,
    ``burstiness`` 1 = Poisson, seeded).
    """
    path = Path(path)
    header, rows = _csv_rows(path)
    i_p, i_o = _column(header, prompt_col, path), _column(header, output_col, path)
    lens = [(ln, _count(f[i_p], prompt_col, f"{path}:{ln}", 1),
             _count(f[i_o], output_col, f"{path}:{ln}", 0)) for ln, f in rows]
    if not lens:
        raise TraceError(f"{path}: the trace holds no requests")
    arrivals = gamma_arrivals(len(lens), rate, burstiness, seed)
    reqs = [TraceRequest(float(a), p, o, line=ln)
            for a, (ln, p, o) in zip(arrivals, lens, strict=True)]
    return _finish(name or f"{path.stem}-r{rate:g}-b{burstiness:g}-s{seed}", path, reqs)


# ----------------------------------------------------------------------------- dispatch


def resolve_trace_path(path_or_name: str | Path) -> Path:
    """An existing path as is; a bare name (with or without suffix) in the traces dir."""
    p = Path(path_or_name)
    if p.exists():
        return p
    if p.parent == Path(".") or str(p.parent) == "":
        try:
            d = traces_dir()
        except SharedDataNotFound as e:
            raise TraceError(f"trace not found: {str(path_or_name)!r} is neither a file nor "
                             f"a trace name; available: none ({e})") from None
        candidates = [d / p.name] + [d / (p.name + s) for s in TRACE_SUFFIXES]
        for c in candidates:
            if c.is_file():
                return c
        names = available_traces()
        listing = ", ".join(names) if names else f"none (no trace files in {d})"
        raise TraceError(f"trace not found: {str(path_or_name)!r} is neither a file nor a "
                         f"trace name in {d}; available: {listing}")
    raise TraceError(f"trace file not found: {p}")



def prefix_reuse(trace: Trace, page_size: int) -> float:
    """Share of prompt tokens an unbounded prefix cache would supply, from ``hash_ids``
    alone: each request, in arrival order, reuses the longest run of its leading blocks
    that earlier prompts covered (in full pages of ``page_size``), never its own last
    token (whose logits must be computed). 0.0 for a trace without block hashes."""
    block = trace.hash_block_size
    covered: dict[tuple[int, int], int] = {}  # (position, id) -> tokens cached in it
    hits = total = 0
    for r in trace:
        found = 0
        for b, h in enumerate(r.hash_ids):
            mine = min(block, r.prompt_len - b * block)
            take = min(covered.get((b, h), 0), mine)
            found += take
            if take < mine:
                break
        hits += min(found, (r.prompt_len - 1) // page_size * page_size)
        total += r.prompt_len
        for b, h in enumerate(r.hash_ids):
            full = max(0, min(block, r.prompt_len - b * block)) // page_size * page_size
            covered[(b, h)] = max(covered.get((b, h), 0), full)
    return hits / total if total else 0.0

def load_trace(path_or_name: str | Path, **kw: Any) -> Trace:
    """Load a trace by path or bare name, dispatching on suffix and header.

    ``.jsonl`` -> :func:`load_mooncake_jsonl` (``jitter_s``, ``seed``). ``.csv`` with the
    Azure header -> :func:`load_azure_csv`; with BurstGPT columns -> :func:`load_burstgpt_csv`;
    any other CSV -> :func:`load_lengths_csv` (needs ``rate``). Extra keywords go to the
    loader chosen.
    """
    path = resolve_trace_path(path_or_name)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_mooncake_jsonl(path, **kw)
    if suffix == ".csv":
        first = _read_text(path).split("\n", 1)[0].strip()
        if not first:
            raise TraceError(f"{path}: empty file (no CSV header)")
        header = tuple(h.strip() for h in next(csv.reader([first]), []))
        if header == AZURE_HEADER:
            return load_azure_csv(path, **kw)
        if all(c in header for c in BURSTGPT_COLUMNS):
            return load_burstgpt_csv(path, **kw)
        if "rate" not in kw:
            raise TraceError(f"{path}: a length-only CSV has no arrival times; pass rate= "
                             "(requests/s) and optionally burstiness= and seed=")
        return load_lengths_csv(path, **kw)
    raise TraceError(f"{path}: unknown trace format {suffix!r} (expected .csv or .jsonl)")
