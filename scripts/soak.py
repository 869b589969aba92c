"""Soak: a bounded mixed run of good and hostile traffic against real server processes.

    python scripts/soak.py                  # one server, then two replicas behind the router
    python scripts/soak.py --rounds 3 --targets server

Each target (one ``fbjax.serve``; two replicas behind ``fbjax.router``) gets, per round:
good requests (streamed and not, greedy), every bad input of the hardening probe,
clients that disconnect mid-stream, slowloris and silent connections; then, once, an
engine fault injected while streams run (``tests/serve/faulty_server.py``), then a
SIGTERM. It asserts: no 5xx except the injected fault's, every good request finished,
no KV pages or queue slots leaked once traffic stops, server RSS growth under
``--max_rss_growth_mb`` from the end of the first round to the end of the last, and a
bounded exit on SIGTERM. It prints one table and exits non-zero if an assertion fails.
Run it from the repository root (it starts ``python -m tests.serve.faulty_server``);
every request goes to loopback, and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from absl import app, flags

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.serve.server import SMALL, metric  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("targets", ["server", "router"], "What to soak: server, router.")
flags.DEFINE_integer("rounds", 2, "Rounds of mixed traffic per target.")
flags.DEFINE_integer("good", 24, "Good requests per round.")
flags.DEFINE_integer("concurrency", 8, "Good requests in flight at once.")
flags.DEFINE_integer("slow_clients", 20, "Slowloris connections per round.")
flags.DEFINE_float("max_rss_growth_mb", 150.0, "Allowed server RSS growth over the rounds.")
flags.DEFINE_float("time_limit_s", 900.0, "Give up (and fail) after this long.")

HEADER_TIMEOUT_S = 1.0
GRACE_S = 2.0
BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("top_k 2^31", json.dumps({"prompt": "x", "max_tokens": 4, "top_k": 2**31}).encode(), 400),
    ("slo 5e-324", json.dumps({"prompt": "x", "stream": True, "slo_tpot_ms": 5e-324}).encode(),
     400),
    ("lone surrogate", b'{"prompt": "\\ud800", "max_tokens": 2}', 400),
    ("300 prompts", json.dumps({"prompt": ["a"] * 300, "max_tokens": 1}).encode(), 400),
    ("max_tokens '10'", json.dumps({"prompt": "x", "max_tokens": "10"}).encode(), 422),
    ("max_tokens true", json.dumps({"prompt": "x", "max_tokens": True}).encode(), 422),
    ("not json", b"{nope", 400),
    ("deep json", b"[" * 50_000, 400),
    ("2 MB body", json.dumps({"prompt": "x" * 2_000_000}).encode(), 413),
]


@dataclasses.dataclass
class Tally:
    """What one phase of one target saw."""

    target: str
    phase: str
    sent: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    stream_errors: int = 0
    note: str = ""

    def row(self) -> str:
        return (f"| {self.target} | {self.phase} | {self.sent} | {self.ok} | "
                f"{self.client_errors} | {self.server_errors} | {self.stream_errors} | "
                f"{self.note} |")


class Process:
    """A server or router process on loopback with its log in a temporary file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fbjax-soak-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
        self.url = self._wait("listening on http://", 300)

    def _wait(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            if marker in text:
                url = "http://" + text.split(marker, 1)[1].split()[0]
                httpx.get(url + "/health", timeout=30)
                return url
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"not ready in {timeout} s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.monotonic() - start


def server_args(module: str = "fbjax.serve") -> list[str]:
    return ["-m", module, "--port", "0", "--scheduler", "sarathi", *SMALL, "--max_queue", "64",
            "--header_timeout_s", str(HEADER_TIMEOUT_S), "--max_body_bytes", "1000000",
            "--shutdown_grace_s", str(GRACE_S)]


async def one_request(client: httpx.AsyncClient, url: str, i: int, tally: Tally) -> None:
    body = {"prompt": f"soak request {i}", "max_tokens": 12 + i % 8, "temperature": 0,
            "ignore_eos": True, "stream": i % 2 == 0}
    tally.sent += 1
    if not body["stream"]:
        r = await client.post(url + "/v1/completions", json=body)
        count(tally, r.status_code)
        return
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            count(tally, r.status_code)
            return
        finished = False
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"error"' in line:
                tally.stream_errors += 1
            if '"finish_reason":"length"' in line:
                finished = True
        tally.ok += finished


def count(tally: Tally, status: int) -> None:
    if status < 300:
        tally.ok += 1
    elif status < 500:
        tally.client_errors += 1
    else:
        tally.server_errors += 1


async def good_traffic(url: str, n: int, concurrency: int, tally: Tally) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def run(i: int) -> None:
            async with sem:
                await one_request(client, url, i, tally)
        await asyncio.gather(*(run(i) for i in range(n)))


async def bad_traffic(url: str, tally: Tally) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        for name, body, want in BAD_BODIES:
            tally.sent += 1
            r = await client.post(url + "/v1/completions", content=body,
                                  headers={"Content-Type": "application/json"})
            count(tally, r.status_code)
            if r.status_code != want:
                tally.note += f"{name}: {r.status_code} (want {want}); "


async def disconnects(url: str, n: int, tally: Tally) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(n):
            tally.sent += 1
            async with client.stream("POST", url + "/v1/completions", json={
                    "prompt": f"leave early {i}", "max_tokens": 200, "ignore_eos": True,
                    "stream": True}) as r:
                count(tally, r.status_code)
                async for _ in r.aiter_lines():
                    break  # the client leaves after the first event


def slowloris(url: str, n: int, tally: Tally) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    socks += [socket.create_connection((host, int(port)), timeout=5) for _ in range(n // 4)]
    tally.sent += len(socks)
    deadline = time.monotonic() + HEADER_TIMEOUT_S * 4
    closed = 0
    while time.monotonic() < deadline and closed < len(socks):
        closed = 0
        for s in socks:
            try:
                s.setblocking(False)
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        time.sleep(0.2)
    for s in socks:
        s.close()
    tally.ok += closed
    if closed < len(socks):
        tally.note += f"{len(socks) - closed} slow connections still open; "


def leaks(url: str, replicas: list[str]) -> str:
    """'' when every replica is idle with all KV pages free and no queued requests."""
    problems = []
    deadline = time.monotonic() + 30
    for replica in replicas:
        while True:
            text = httpx.get(replica + "/metrics", timeout=10).text
            load = httpx.get(replica + "/load", timeout=10).json()
            free = metric(text, "fbjax_kv_cache_free_pages")
            total = metric(text, "fbjax_kv_cache_total_pages")
            if (free == total and load["num_queued"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if free != total or load["num_queued"]:
            problems.append(f"{replica}: {total - free:.0f} KV pages held, "
                            f"{load['num_queued']} queued")
    return "; ".join(problems)


async def fault_phase(url: str, fault_file: Path, tally: Tally) -> None:
    """Streams in flight when one engine step fails: each ends with an error event.
    The fault is injected once every stream has its first token (not after a fixed
    sleep, which a fast engine outlives), so it meets all of them mid-stream."""
    async with httpx.AsyncClient(timeout=120) as client:
        started = [asyncio.Event() for _ in range(4)]

        async def long_stream(i: int) -> None:
            tally.sent += 1
            try:
                async with client.stream("POST", url + "/v1/completions", json={
                        "prompt": f"fault {i}", "max_tokens": 200, "ignore_eos": True,
                        "stream": True}) as r:
                    if r.status_code != 200:
                        count(tally, r.status_code)
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            started[i].set()
                            if '"error"' in line:
                                tally.stream_errors += 1
            finally:
                started[i].set()  # never leave the injector waiting

        tasks = [asyncio.create_task(long_stream(i)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        fault_file.write_text("step")
        await asyncio.gather(*tasks)


def soak(target: str, rows: list[Tally]) -> list[str]:
    """Run every phase against ``target``; the failed assertions. Every process it
    started is gone when it returns or raises."""
    started: list[Process] = []
    try:
        return _soak(target, rows, started)
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()


def _soak(target: str, rows: list[Tally], started: list[Process]) -> list[str]:
    failures: list[str] = []
    fault_file = Path(tempfile.mkdtemp()) / "fault"
    fault_file.write_text("")
    faulty = Process(server_args("tests.serve.faulty_server"),
                     env={"FBJAX_TEST_FAULT_FILE": str(fault_file)})
    started.append(faulty)
    servers = [faulty]
    router = None
    if target == "router":
        servers.append(Process(server_args()))
        started.append(servers[-1])
        router = Process(["-m", "fbjax.router", "--port", "0", "--header_timeout_s",
                          str(HEADER_TIMEOUT_S), "--max_body_bytes", "1000000",
                          *sum((["--replica", s.url] for s in servers), [])])
        started.append(router)
    url = router.url if router else faulty.url
    rss_start = None
    for rnd in range(FLAGS.rounds):
        for phase, run in [
                ("good", lambda t: asyncio.run(good_traffic(url, FLAGS.good,
                                                            FLAGS.concurrency, t))),
                ("bad input", lambda t: asyncio.run(bad_traffic(url, t))),
                ("disconnects", lambda t: asyncio.run(disconnects(url, 8, t))),
                ("slowloris", lambda t: slowloris(url, FLAGS.slow_clients, t))]:
            tally = Tally(target, f"{phase} (round {rnd + 1})")
            start = time.monotonic()
            run(tally)
            tally.note += f"{time.monotonic() - start:.1f} s"
            rows.append(tally)
            if tally.server_errors or tally.stream_errors:
                failures.append(f"{target} {tally.phase}: unexpected 5xx or stream errors")
            if phase == "good" and tally.ok != tally.sent:
                failures.append(f"{target} {tally.phase}: {tally.sent - tally.ok} of "
                                f"{tally.sent} good requests did not finish")
            if phase == "bad input" and "want" in tally.note:
                failures.append(f"{target} bad input: {tally.note}")
        leak = leaks(url, [s.url for s in servers])
        if leak:
            failures.append(f"{target} round {rnd + 1}: leak: {leak}")
        if rnd == 0:
            rss_start = [s.rss_mb() for s in servers]
    growth = max(s.rss_mb() - r0 for s, r0 in zip(servers, rss_start, strict=True))
    rows.append(Tally(target, "RSS growth", note=f"{growth:+.0f} MB over rounds 2..{FLAGS.rounds}"))
    if growth > FLAGS.max_rss_growth_mb:
        failures.append(f"{target}: RSS grew {growth:.0f} MB")
    tally = Tally(target, "injected engine fault")
    asyncio.run(fault_phase(url, fault_file, tally))
    tally.note = "streams in flight get an error event; the engine goes on"
    rows.append(tally)
    if tally.stream_errors == 0:
        failures.append(f"{target}: the injected fault reached no client")
    after = Tally(target, "after the fault")
    asyncio.run(good_traffic(url, 4, 4, after))
    rows.append(after)
    if after.ok != after.sent:
        failures.append(f"{target}: requests after the fault failed")
    leak = leaks(url, [s.url for s in servers])
    if leak:
        failures.append(f"{target} after the fault: leak: {leak}")
    for proc, name in [(router, "router"), *[(s, "replica") for s in servers]]:
        if proc is None:
            continue
        code, took = proc.terminate(GRACE_S + 15)
        rows.append(Tally(target, f"SIGTERM {name}", note=f"exit {code} in {took:.1f} s"))
        if code != 0:
            failures.append(f"{target}: {name} exited with {code} on SIGTERM")
    return failures


def main(argv: list[str]) -> int:
    del argv
    rows: list[Tally] = []
    failures: list[str] = []
    start = time.monotonic()
    for target in FLAGS.targets:
        if time.monotonic() - start > FLAGS.time_limit_s:
            failures.append("time limit reached")
            break
        failures += soak(target, rows)
    print("| target | phase | sent | 2xx / done | 4xx | 5xx | stream errors | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(row.row())
    print(f"\n{len(failures)} failed assertions in {time.monotonic() - start:.0f} s")
    for failure in failures:
        print(" -", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    app.run(main)
