"""Trace loaders: the real shared traces, synthetic arrivals, transforms, malformed input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from fbjax import traces
from fbjax.traces import (
    Trace,
    TraceError,
    TraceRequest,
    gamma_arrivals,
    load_azure_csv,
    load_burstgpt_csv,
    load_lengths_csv,
    load_mooncake_jsonl,
    load_trace,
    parse_timestamp_ns,
    synthetic,
)

TRACES = traces.traces_dir()
needs_shared = pytest.mark.skipif(
    not TRACES.is_dir(),
    reason=f"shared trace directory {TRACES} is absent (set FBJAX_SHARED to the shared dir)")


# ----------------------------------------------------------------------------- real traces

# (name, rows, mean rate req/s or None, mean prompt len, mean output len), from the README.
REAL = [
    ("azure_llm_2023_code", 8_819, 2.57, 2_047.8, 27.9),
    ("azure_llm_2023_conv", 19_366, 5.53, 1_154.7, 211.1),
    ("mooncake_fast25_conversation", 12_031, 3.40, 12_035.1, 342.6),
    ("mooncake_fast25_synthetic", 3_993, 3.91, 15_326, 149),
]


@needs_shared
@pytest.mark.parametrize("name,rows,rate,mean_in,mean_out", REAL)
def test_real_trace_rows_and_rate(name, rows, rate, mean_in, mean_out):
    t = load_trace(name)
    assert len(t) == rows
    assert t.mean_rate == pytest.approx(rate, abs=0.006)
    assert t.prompt_lens.mean() == pytest.approx(mean_in, rel=1e-3)
    assert t.output_lens.mean() == pytest.approx(mean_out, rel=5e-3)
    arr = t.arrivals
    assert arr[0] >= 0 and np.all(np.diff(arr) >= 0)


@needs_shared
def test_azure_spans_and_subsecond_parse():
    code = load_trace("azure_llm_2023_code.csv")
    assert code.duration_s == pytest.approx(3_435.9, abs=0.05)
    assert code[0].arrival_s == 0.0 and code[0].prompt_len == 4808 and code[0].output_len == 10
    # Row 2 is 18:17:04.0319600, row 1 18:17:03.9799600: 52 ms later, to the 100 ns digit.
    assert code[1].arrival_s == pytest.approx(0.052, abs=1e-9)
    assert code[1].line == 3
    conv = load_azure_csv(TRACES / "azure_llm_2023_conv.csv")
    assert conv.duration_s == pytest.approx(3_501.7, abs=0.05)


@needs_shared
def test_mooncake_conversation_fields():
    t = load_trace("mooncake_fast25_conversation")
    assert t.duration_s == pytest.approx(3_536.999)
    assert len({r.arrival_s for r in t}) == 1_180
    assert t[0].hash_ids[:3] == (0, 1, 2)
    assert np.mean([len(r.hash_ids) for r in t]) == pytest.approx(24.0, abs=0.05)
    for r in t.requests[:200]:  # 512-token blocks cover the prompt
        assert (len(r.hash_ids) - 1) * 512 < r.prompt_len <= len(r.hash_ids) * 512


@needs_shared
def test_mooncake_jitter_keeps_counts_and_bucket():
    raw = load_trace("mooncake_fast25_conversation")
    jit = load_trace("mooncake_fast25_conversation", jitter_s=3.0, seed=7)
    assert len(jit) == len(raw)
    assert len({r.arrival_s for r in jit}) > 12_000  # buckets spread out
    assert np.all(np.diff(jit.arrivals) >= 0)
    by_line = {r.line: r for r in raw}
    for r in jit:
        base = by_line[r.line].arrival_s
        assert base <= r.arrival_s < base + 3.0
        assert r.prompt_len == by_line[r.line].prompt_len
    again = load_trace("mooncake_fast25_conversation", jitter_s=3.0, seed=7)
    assert np.array_equal(again.arrivals, jit.arrivals)
    other = load_trace("mooncake_fast25_conversation", jitter_s=3.0, seed=8)
    assert not np.array_equal(other.arrivals, jit.arrivals)


@needs_shared
def test_vidur_lengths_with_synthetic_arrivals():
    t = load_trace("vidur_arxiv_summarization_lengths", rate=4.0, seed=1)
    assert len(t) == 28_257
    assert t.prompt_lens.mean() == pytest.approx(2_588.1, abs=0.05)
    assert t.output_lens.mean() == pytest.approx(291.4, abs=0.05)
    assert t.mean_rate == pytest.approx(4.0, rel=0.03)
    assert t[0].arrival_s == 0.0
    with pytest.raises(TraceError, match="rate="):
        load_trace("vidur_arxiv_summarization_lengths")


@needs_shared
def test_unknown_name_lists_available_traces():
    with pytest.raises(TraceError) as e:
        load_trace("azure_llm_2099")
    assert "azure_llm_2099" in str(e.value)
    assert "azure_llm_2023_conv" in str(e.value) and "mooncake_fast25_conversation" in str(e.value)


def test_shared_dir_env_override(tmp_path, monkeypatch):
    d = tmp_path / "data" / "traces"
    d.mkdir(parents=True)
    (d / "tiny.jsonl").write_text('{"timestamp": 5, "input_length": 3, "output_length": 2}\n')
    monkeypatch.setenv("FBJAX_SHARED", str(tmp_path))
    assert traces.traces_dir() == d
    assert traces.available_traces() == ["tiny"]
    t = load_trace("tiny")
    assert len(t) == 1 and t[0].arrival_s == 0.005
    with pytest.raises(TraceError, match="available: tiny"):
        load_trace("nope")
    monkeypatch.setenv("FBJAX_SHARED", str(tmp_path / "missing"))
    with pytest.raises(TraceError, match="available: none"):
        load_trace("tiny")


def test_missing_file_path(tmp_path):
    missing = tmp_path / "x" / "gone.csv"
    with pytest.raises(TraceError, match="not found.*gone.csv"):
        load_trace(missing)
    with pytest.raises(TraceError, match="not found"):
        load_azure_csv(tmp_path / "gone.csv")


# ----------------------------------------------------------------------------- transforms


def _toy() -> Trace:
    reqs = [TraceRequest(t, 10 + i, 5, line=i + 2) for i, t in enumerate([0.0, 1.0, 2.0, 4.0])]
    return Trace("toy", list(reversed(reqs)))


def test_trace_sorted_duration_rate_head():
    t = _toy()
    assert [r.arrival_s for r in t] == [0.0, 1.0, 2.0, 4.0]
    assert t.duration_s == 4.0 and t.mean_rate == 1.0
    assert len(t.head(2)) == 2 and t.head(2)[1].arrival_s == 1.0
    assert Trace("one", [TraceRequest(3.0, 1, 1)]).mean_rate == math.inf
    assert Trace("empty", []).mean_rate == 0.0


def test_scaled_multiplies_rate():
    t = _toy()
    s = t.scaled(2.0)
    assert [r.arrival_s for r in s] == [0.0, 0.5, 1.0, 2.0]
    assert s.mean_rate == pytest.approx(2 * t.mean_rate)
    assert [r.prompt_len for r in s] == [r.prompt_len for r in t]
    assert t[3].arrival_s == 4.0  # the original is untouched
    with pytest.raises(ValueError):
        t.scaled(0.0)


def test_sliced_rebases():
    t = _toy()
    s = t.sliced(1.0, 4.0)
    assert [r.arrival_s for r in s] == [0.0, 1.0]
    assert [r.prompt_len for r in s] == [11, 12]
    assert [r.arrival_s for r in t.sliced(2.0)] == [0.0, 2.0]
    with pytest.raises(ValueError):
        t.sliced(3.0, 1.0)


def test_to_requests():
    reqs = _toy().to_requests(ttft_slo=1.0, tpot_slo=0.1, id_prefix="r")
    assert [r.request_id for r in reqs] == ["r0", "r1", "r2", "r3"]
    assert reqs[2].arrival_time == 2.0 and reqs[2].prompt_len == 12
    assert reqs[2].sampling.max_tokens == 5 and reqs[2].sampling.ignore_eos
    assert reqs[0].ttft_slo == 1.0 and reqs[0].tpot_slo == 0.1


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape", [0.25, 1.0, 4.0])
def test_gamma_burstiness_cv(shape):
    arr = gamma_arrivals(40_000, rate=10.0, burstiness=shape, seed=3)
    gaps = np.diff(arr)
    assert arr[0] == 0.0
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(shape), rel=0.05)


def test_gamma_infinite_rate_and_errors():
    assert np.all(gamma_arrivals(5, math.inf) == 0.0)
    for bad in (dict(rate=0.0), dict(rate=1.0, burstiness=0.0)):
        with pytest.raises(ValueError):
            gamma_arrivals(5, **bad)



def test_gamma_arrivals_keep_a_traces_requests_and_mean_rate():
    base = synthetic(4_000, rate=5.0, prompt_len=(10, 2000), output_len=(1, 300), seed=2)
    bursty = base.with_gamma_arrivals(0.25, seed=1)
    assert bursty.name.endswith("@gamma0.25")
    assert list(bursty.prompt_lens) == list(base.prompt_lens)
    assert list(bursty.output_lens) == list(base.output_lens)
    assert bursty.mean_rate == pytest.approx(base.mean_rate, rel=0.1)
    gaps = np.diff(bursty.arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)  # 1 / sqrt(0.25)
    with pytest.raises(ValueError, match="two or more"):
        base.head(1).with_gamma_arrivals(0.5)

def test_synthetic_lengths():
    t = synthetic(2_000, rate=5.0, prompt_len=(10, 20), output_len=7, seed=1)
    p = t.prompt_lens
    assert p.min() == 10 and p.max() == 20  # inclusive range
    assert np.all(t.output_lens == 7)
    assert t.mean_rate == pytest.approx(5.0, rel=0.08)
    again = synthetic(2_000, rate=5.0, prompt_len=(10, 20), output_len=7, seed=1)
    assert np.array_equal(again.arrivals, t.arrivals) and np.array_equal(again.prompt_lens, p)
    with pytest.raises(ValueError):
        synthetic(3, rate=1.0, prompt_len=(5, 4), output_len=1)


def test_lengths_csv_custom_columns(tmp_path):
    f = tmp_path / "lens.csv"
    f.write_text("in,out\n5,6\n7,8\n9,10\n")
    t = load_lengths_csv(f, rate=1.0, prompt_col="in", output_col="out")
    assert [(r.prompt_len, r.output_len, r.line) for r in t] == [(5, 6, 2), (7, 8, 3), (9, 10, 4)]
    with pytest.raises(TraceError, match="no column 'num_prefill_tokens'.*in, out"):
        load_lengths_csv(f, rate=1.0)


def test_burstgpt_csv(tmp_path):
    f = tmp_path / "burst.csv"
    f.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5.0,ChatGPT,100,20,120,Conversation log\n"
                 "6.5,GPT-4,50,0,50,Conversation log\n"
                 "7.0,GPT-4,30,10,40,API log\n")
    t = load_trace(f)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in t] == [(0.0, 100, 20),
                                                                      (2.0, 30, 10)]
    assert len(load_burstgpt_csv(f, model="GPT-4")) == 1
    assert len(load_burstgpt_csv(f, skip_failed=False)) == 3


# ----------------------------------------------------------------------------- malformed

AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROW = "2023-11-16 18:17:03.9799600,4808,10\n"


def test_timestamp_parse():
    a = parse_timestamp_ns("2023-11-16 18:17:03.9799600")
    b = parse_timestamp_ns("2023-11-16 18:17:04.03196")
    assert b - a == 52_000_000
    assert parse_timestamp_ns("2023-11-17 00:00:00") - parse_timestamp_ns(
        "2023-11-16 23:59:59.5") == 500_000_000
    with pytest.raises(ValueError):
        parse_timestamp_ns("2023-11-16 18:17:03.12345678901")


def test_azure_no_trailing_newline(tmp_path):
    f = tmp_path / "az.csv"
    f.write_text(AZ + ROW + "2023-11-16 18:17:05.0000000,1,2")
    t = load_trace(f)
    assert len(t) == 2 and t[1].arrival_s == pytest.approx(1.02004)


@pytest.mark.parametrize("body,line,pattern", [
    (ROW + "2023-11-16 18:17:xx.1,5,6\n", 3, "bad TIMESTAMP"),
    (ROW + "2023-11-16 18:17:05.1,5.5,6\n", 3, "ContextTokens must be an integer"),
    (ROW + ROW + "2023-11-16 18:17:05.1,5,-1\n", 4, "GeneratedTokens is negative"),
    (ROW + "2023-11-16 18:17:05.1,5\n", 3, "expected 3 columns"),
    (ROW + "2023-11-16 18:17:05.1,5,6,7\n", 3, "expected 3 columns"),
    ("2023-11-16 18:17:05.1,0,6\n", 2, "ContextTokens is too small"),
    (ROW + "2023-11-16 18:17:01.1,5,6\n", 3, "earlier than the first"),
])
def test_azure_malformed(tmp_path, body, line, pattern):
    f = tmp_path / "bad_az.csv"
    f.write_text(AZ + body)
    with pytest.raises(TraceError) as e:
        load_trace(f)
    msg = str(e.value)
    assert f"bad_az.csv:{line}:" in msg and str(tmp_path) in msg
    assert re.search(pattern, msg), msg


GOOD = '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n'


@pytest.mark.parametrize("body,line,pattern", [
    (GOOD + '{"timestamp": 3000, "input_length": 10\n', 2, "bad JSON"),
    (GOOD + GOOD + '{"timestamp": 3000, "input_length": 10}\n', 3, "missing key 'output_length'"),
    (GOOD + '{"timestamp": 3000, "input_length": "x", "output_length": 1}\n', 2,
     "input_length must be an integer"),
    (GOOD + '{"timestamp": 3000, "input_length": 4, "output_length": -3}\n', 2,
     "output_length is negative"),
    (GOOD + '{"timestamp": -1, "input_length": 4, "output_length": 3}\n', 2, "negative"),
    (GOOD + '[1, 2]\n', 2, "expected a JSON object"),
    (GOOD + '{"timestamp": 1, "input_length": 4, "output_length": 3, "hash_ids": "a"}\n', 2,
     "hash_ids"),
])
def test_mooncake_malformed(tmp_path, body, line, pattern):
    f = tmp_path / "bad_mc.jsonl"
    f.write_text(body)
    with pytest.raises(TraceError, match=pattern) as e:
        load_mooncake_jsonl(f)
    assert f"bad_mc.jsonl:{line}:" in str(e.value)


def test_lengths_csv_malformed(tmp_path):
    f = tmp_path / "bad_len.csv"
    f.write_text("num_prefill_tokens,num_decode_tokens\n5,6\n7,abc\n")
    with pytest.raises(TraceError, match=r"bad_len.csv:3: num_decode_tokens must be an integer"):
        load_trace(f, rate=1.0)


@pytest.mark.parametrize("name,text", [
    ("empty.csv", ""),
    ("header_only.csv", AZ),
    ("empty.jsonl", "\n\n"),
    ("lens_header_only.csv", "num_prefill_tokens,num_decode_tokens\n"),
])
def test_empty_traces(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(TraceError, match=name.replace(".", r"\.")):
        load_trace(f, **({"rate": 1.0} if name.startswith("lens") else {}))


def test_unknown_suffix(tmp_path: Path):
    f = tmp_path / "t.parquet"
    f.write_text("x")
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(f)
