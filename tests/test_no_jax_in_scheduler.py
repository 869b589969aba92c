"""The schedulers, the KV page allocator and the configs must never import JAX: the
simulator and CPU-only tools use them without it (and importing JAX is slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

MODULES = ("fbjax.sched.vllm", "fbjax.sched.sarathi", "fbjax.sched.fairbatching",
           "fbjax.sched.latency", "fbjax.profiling.vidur", "fbjax.sched.registry",
           "fbjax.sched.kv_cache",
           "fbjax.config", "fbjax.traces", "fbjax.metrics", "fbjax.sim.simulator",
           "fbjax.router.policy", "fbjax.router.dispatch", "fbjax.sim.cluster")

PROBE = f"""
import sys
for name in {MODULES!r}:
    __import__(name)
leaked = sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib")))
assert not leaked, "JAX imported by the scheduler side: " + ", ".join(leaked[:5])
print("ok")
"""


def test_scheduler_side_does_not_import_jax():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
