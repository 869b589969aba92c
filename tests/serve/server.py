"""A real ``python -m fbjax.serve`` process on loopback, for the server tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

# The same bucket, cache and context settings as tests/conftest.py's engine_config, so
# the server reuses the compilation cache and offline references run the same shapes.
SMALL = ["--model", "builtin-tiny", "--token_buckets", "16,32,64,128", "--seq_buckets", "4,16",
         "--page_size", "16", "--num_pages", "512", "--max_model_len", "512",
         "--max_num_batched_tokens", "64"]
API_KEY = "test-key"


class ServerProcess:
    def __init__(self, *args: str, scheduler: str = "sarathi", module: str = "fbjax.serve",
                 env: dict[str, str] | None = None, default_model: bool = False) -> None:
        """``default_model``: no --model flag (the server's default model), else the
        built-in one."""
        self._log = tempfile.NamedTemporaryFile("w+", prefix="fbjax-serve-", suffix=".log",
                                                delete=False)
        env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
        small = SMALL[2:] if default_model else SMALL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", "--scheduler", scheduler,
             *small, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready()
        self.base_url = self.url + "/v1"

    def _wait_ready(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+)", self.log())
            if match:
                url = match.group(1)
                httpx.get(url + "/health", timeout=30).raise_for_status()
                return url
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self._log.name) as f:
            return f.read()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self._log.name)
        return self.proc.returncode


DONE = "[DONE]"


def sse_event(line: str) -> dict | str | None:
    """One line of a server-sent-event stream: the event's JSON, ``DONE`` for the
    ``[DONE]`` sentinel, None for anything that is not a ``data:`` line."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    return DONE if data == DONE else json.loads(data)


def metric(text: str, name: str, labels: dict[str, str] | None = None,
           default: float | None = None) -> float:
    """One sample's value from a Prometheus exposition (parsed by prometheus_client);
    ``default`` if there is no such sample (a labelled counter not yet incremented)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(
                    sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    if default is not None:
        return default
    raise KeyError(f"no sample {name} {labels or ''}")
