"""Multi-host tensor parallelism with two local processes (jax.distributed over Gloo on
CPU): ``python -m fbjax.generate`` split over both gives the one-process output, and
only process 0 prints it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model", "builtin-tiny", "--prompt", "hello there", "--prompt",
          "two hosts, one model", "--max_tokens", "16",
          "--token_buckets", "16,64", "--seq_buckets", "4", "--num_pages", "128",
          "--max_model_len", "256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(*flags: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "fbjax.generate", *COMMON, *flags],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_process_tensor_parallel_generate_matches_one_process():
    address = f"127.0.0.1:{free_port()}"
    hosts = [generate("--tensor_parallel", "2", "--num_processes", "2", "--process_id", str(i),
                      "--coordinator_address", address) for i in range(2)]
    single = generate()
    outs = [p.communicate(timeout=600) for p in (*hosts, single)]
    for p, (_, err) in zip((*hosts, single), outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Gloo announces its connections on stdout from C++; the completions are the rest.
    leader, follower, alone = ("".join(ln for ln in out.splitlines(keepends=True)
                                       if not ln.startswith("[Gloo]")) for out, _ in outs)
    assert leader == alone and alone.strip()
    assert follower == ""
