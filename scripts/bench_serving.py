"""Serving benchmark against an OpenAI-compatible server, in the style of vLLM's
``benchmark_serving``: requests arrive on a schedule, each streams its tokens, and
TTFT, TPOT, ITL and E2EL (mean, median, p50, p99) and goodput are printed.

Workloads (both built by fbjax.traces):

* synthetic: ``--num_prompts`` requests with Gamma inter-arrivals at ``--request_rate``
  (``inf``: all at once) and ``--burstiness`` (1 = Poisson), prompts of
  ``--input_len`` tokens and outputs of ``--output_len`` tokens (``lo,hi`` for uniform);
* a trace (``--trace azure_llm_2023_conv``, a name in ../shared/data/traces or a path):
  its arrivals (times ``--rate_scale``, from ``--start_s``) and lengths, clipped to
  ``--max_input_len`` / ``--max_output_len`` and to the model's context.

Prompts of the completions endpoint are token ids (byte values, valid in any
vocabulary of 256 or more), so their lengths are exact for any tokenizer; the chat
endpoint sends random text. Every request sets ``max_tokens`` to its output length
and ``ignore_eos``. Metrics follow fbjax.metrics (vLLM's definitions); a token's time is
the arrival of the SSE event that carried it (the rare event that carries several
tokens, e.g. a multi-byte character, counts its extra tokens at its own time).
``--goodput ttft:MS tpot:MS`` sets the SLOs for goodput and attainment.

Against a running server::

    python -m fbjax.serve --scheduler sarathi &
    python scripts/bench_serving.py --base_url http://127.0.0.1:8000 --request_rate 4

Or start a server per scheduler, one after the other, and compare them::

    python scripts/bench_serving.py --launch sarathi,vllm,fairbatching \\
        --server_args="--token_buckets 16,32,64,128 --seq_buckets 4,16" \\
        --num_prompts 100 --request_rate 8 --goodput ttft:500 tpot:50

Or two replicas behind ``python -m fbjax.router``, one router policy after the other::

    python scripts/bench_serving.py --router_policies pab,round_robin --replicas 2 \
        --launch fairbatching --num_prompts 200 --request_rate 16
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fbjax.metrics import RequestMetrics, format_table, summarize  # noqa: E402
from fbjax.traces import Trace, load_trace, synthetic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("base_url", "http://127.0.0.1:8000", "Server to benchmark.")
flags.DEFINE_list("launch", None, "Instead of --base_url: start `python -m fbjax.serve "
                  "--scheduler S` for each scheduler S listed, benchmark it, stop it.")
flags.DEFINE_string("server_args", "", "Extra flags for the servers --launch starts.")
flags.DEFINE_list("router_policies", None, "Instead of --base_url: start --replicas servers "
                  "(--launch's first scheduler, default fairbatching), then for each policy "
                  "listed a `python -m fbjax.router --policy P` over them, and benchmark it.")
flags.DEFINE_integer("replicas", 2, "Replicas behind the router with --router_policies.")
flags.DEFINE_enum("endpoint", "completions", ["completions", "chat"], "API to call.")
flags.DEFINE_string("model", None, "Model name (default: the server's first model).")
flags.DEFINE_string("api_key", None, "Bearer key for the server.")
flags.DEFINE_integer("num_prompts", 100, "Requests to send (a trace: at most this many).")
flags.DEFINE_float("request_rate", math.inf, "Requests per second (synthetic arrivals).")
flags.DEFINE_float("burstiness", 1.0, "Gamma shape of inter-arrivals; 1 = Poisson.")
flags.DEFINE_list("input_len", ["32", "256"], "Prompt tokens: N, or lo,hi (uniform).")
flags.DEFINE_list("output_len", ["16", "64"], "Output tokens: N, or lo,hi (uniform).")
flags.DEFINE_string("trace", None, "Trace name or path instead of synthetic arrivals.")
flags.DEFINE_float("rate_scale", 1.0, "Trace: multiply its arrival rate by this.")
flags.DEFINE_float("start_s", 0.0, "Trace: start this many seconds in.")
flags.DEFINE_integer("max_input_len", 1024, "Trace: clip prompts to this many tokens.")
flags.DEFINE_integer("max_output_len", 256, "Trace: clip outputs to this many tokens.")
flags.DEFINE_integer("max_concurrency", None, "At most this many requests in flight.")
flags.DEFINE_multi_string("goodput", None, "SLOs as ttft:MS and/or tpot:MS, e.g. "
                          "--goodput ttft:500 --goodput tpot:50 (or both in one).")
flags.DEFINE_integer("seed", 0, "Seed for arrivals, lengths and prompts.")
flags.DEFINE_string("json", None, "Write every summary to this JSON file.")


# ----------------------------------------------------------------------------- workload


def _lengths(values: list[str], name: str) -> int | tuple[int, int]:
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} takes N or lo,hi") from None
    if len(ints) not in (1, 2):
        raise app.UsageError(f"--{name} takes N or lo,hi")
    return ints[0] if len(ints) == 1 else (ints[0], ints[1])


def parse_goodput(specs: list[str] | None) -> tuple[float | None, float | None]:
    """``["ttft:500", "tpot:50"]`` (or one string with both) -> SLOs in seconds."""
    slos: dict[str, float] = {}
    for part in " ".join(specs or []).split():
        key, _, value = part.partition(":")
        if key not in ("ttft", "tpot") or not value:
            raise app.UsageError(f"--goodput takes ttft:MS and tpot:MS, got {part!r}")
        try:
            slos[key] = float(value) / 1000.0
        except ValueError:
            raise app.UsageError(f"--goodput {part!r}: not a number of ms") from None
    return slos.get("ttft"), slos.get("tpot")


def workload(max_model_len: int) -> Trace:
    if FLAGS.trace:
        trace = load_trace(FLAGS.trace).sliced(FLAGS.start_s).head(FLAGS.num_prompts)
        if FLAGS.rate_scale != 1.0:
            trace = trace.scaled(FLAGS.rate_scale)
    else:
        trace = synthetic(FLAGS.num_prompts, FLAGS.request_rate,
                          _lengths(FLAGS.input_len, "input_len"),
                          _lengths(FLAGS.output_len, "output_len"), FLAGS.burstiness,
                          FLAGS.seed)
    reqs = []
    for r in trace:
        prompt = max(1, min(r.prompt_len, FLAGS.max_input_len, max_model_len - 2))
        output = max(1, min(r.output_len, FLAGS.max_output_len, max_model_len - prompt))
        reqs.append(dataclasses.replace(r, prompt_len=prompt, output_len=output))
    return Trace(trace.name, reqs)


def prompts(trace: Trace) -> list:
    rng = np.random.default_rng([FLAGS.seed, 2])
    if FLAGS.endpoint == "completions":
        return [rng.integers(32, 127, r.prompt_len).tolist() for r in trace]
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    return ["".join(rng.choice(letters, r.prompt_len)) for r in trace]


# ----------------------------------------------------------------------------- client


async def one_request(client: httpx.AsyncClient, model: str, prompt, output_len: int,
                      ) -> tuple[float, list[float], int, int, str | None]:
    """(start, token times, prompt tokens, output tokens, error) of one streamed request."""
    body = {"model": model, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if FLAGS.endpoint == "completions":
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user",
                                                           "content": prompt}]
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return start, [], 0, 0, f"HTTP {r.status_code}: {r.text[:200]}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text or choice.get("finish_reason"):
                        times.append(now)
    except httpx.HTTPError as e:
        return start, [], 0, 0, f"{type(e).__name__}: {e}"
    if usage is None:
        return start, times, 0, len(times), "no usage in the stream"
    n = usage["completion_tokens"]
    times = times[:n] + [times[-1]] * (n - len(times)) if times else []
    return start, times, usage["prompt_tokens"], n, None


async def run_benchmark(base_url: str) -> dict:
    headers = {"Authorization": f"Bearer {FLAGS.api_key}"} if FLAGS.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None,
                                 limits=limits) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model = FLAGS.model or card["id"]
        trace = workload(int(card.get("max_model_len", 2048)))
        texts = prompts(trace)
        sem = asyncio.Semaphore(FLAGS.max_concurrency or len(trace) or 1)
        await one_request(client, model, texts[0], 2)  # warm-up, not measured

        async def scheduled(i: int, t0: float):
            await asyncio.sleep(max(0.0, t0 + trace[i].arrival_s - time.perf_counter()))
            async with sem:
                return await one_request(client, model, texts[i], trace[i].output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(scheduled(i, t0) for i in range(len(trace))))
        duration = time.perf_counter() - t0
    ttft_slo, tpot_slo = parse_goodput(FLAGS.goodput)
    records = [RequestMetrics.from_times(start, times, prompt_len, request_id=str(i))
               for i, (start, times, prompt_len, _, _) in enumerate(results)]
    errors = [e for *_, e in results if e]
    summary = summarize(records, duration, ttft_slo, tpot_slo, percentiles=(50, 99))
    print(f"workload: {trace.name}, {len(trace)} requests, mean prompt "
          f"{trace.prompt_lens.mean():.0f} tokens, mean output {trace.output_lens.mean():.0f}")
    print(format_table(summary))
    if errors:
        print(f"failed requests: {len(errors)}; first: {errors[0]}")
    return {**summary.to_dict(), "failed": len(errors), "workload": trace.name}


# ----------------------------------------------------------------------------- launching


def launch(scheduler: str) -> tuple[subprocess.Popen, str, Path]:
    """A ``python -m fbjax.serve`` process with ``scheduler``: (process, URL, its log)."""
    return launch_module("fbjax.serve", "--scheduler", scheduler,
                         *shlex.split(FLAGS.server_args), tag=scheduler)


def launch_module(module: str, *args: str, tag: str) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkstemp(prefix=f"bench-serve-{tag}-", suffix=".log")[1])
    cmd = [sys.executable, "-m", module, "--port", "0", *args]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    while True:
        match = re.search(r"listening on (http://\S+)", log.read_text())
        if match:
            return proc, match.group(1), log
        if proc.poll() is not None:
            raise RuntimeError(log.read_text().strip().splitlines()[-1])
        time.sleep(0.5)


def comparison(rows: dict[str, dict]) -> str:
    cols = [("completed", "{:.0f}"), ("mean_ttft_ms", "{:.1f}"), ("p50_ttft_ms", "{:.1f}"),
            ("p99_ttft_ms", "{:.1f}"), ("mean_tpot_ms", "{:.1f}"), ("p99_tpot_ms", "{:.1f}"),
            ("mean_itl_ms", "{:.1f}"), ("p99_itl_ms", "{:.1f}"), ("mean_e2el_ms", "{:.1f}"),
            ("p99_e2el_ms", "{:.1f}"), ("goodput", "{:.2f}"), ("output_throughput", "{:.1f}")]
    head = f"{'run':<26}" + "".join(f"{c:>19}" for c, _ in cols)
    lines = [head]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"{name:<26}  {row['error']}")
            continue
        cells = [("-" if row.get(c) is None else fmt.format(row[c])) for c, fmt in cols]
        lines.append(f"{name:<26}" + "".join(f"{v:>19}" for v in cells))
    return "\n".join(lines)


def stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    log.unlink()


def benchmark_routers() -> dict[str, dict]:
    """Replicas started once; one router per policy over them, benchmarked in turn."""
    scheduler = (FLAGS.launch or ["fairbatching"])[0]
    replicas = [launch(scheduler) for _ in range(FLAGS.replicas)]
    out = {}
    try:
        for policy in FLAGS.router_policies:
            print(f"\n### router {policy} over {FLAGS.replicas} x {scheduler}", flush=True)
            urls = [a for _, url, _ in replicas for a in ("--replica", url)]
            proc, url, log = launch_module("fbjax.router", "--policy", policy, *urls,
                                           tag=f"router-{policy}")
            try:
                out[f"{scheduler}+{policy}"] = asyncio.run(run_benchmark(url))
            finally:
                stop(proc, log)
    finally:
        for proc, _, log in replicas:
            stop(proc, log)
    return out


def main(argv: list[str]) -> int:
    del argv
    parse_goodput(FLAGS.goodput)  # flag errors before anything starts
    if FLAGS.router_policies:
        out = benchmark_routers()
        print("\n" + comparison(out))
    elif not FLAGS.launch:
        out = {"server": asyncio.run(run_benchmark(FLAGS.base_url.rstrip("/")))}
    else:
        out = {}
        for scheduler in FLAGS.launch:
            print(f"\n### scheduler {scheduler}", flush=True)
            try:
                proc, url, log = launch(scheduler)
            except RuntimeError as e:
                print(f"server did not start: {e}")
                out[scheduler] = {"error": f"server did not start: {e}"}
                continue
            try:
                out[scheduler] = asyncio.run(run_benchmark(url))
            finally:
                stop(proc, log)
        print("\n" + comparison(out))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    app.run(main)
