"""Bad serve flags are clear errors before anything listens."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "nope"], "unknown scheduler"),
    (["--max_queue", "0"], "--max_queue"),
    (["--token_buckets", "16,abc"], "--token_buckets"),
    (["--slo_tpot_ms", "-1"], "--slo_tpot_ms"),
])
def test_bad_flags(args, message):
    proc = subprocess.run([sys.executable, "-m", "fbjax.serve", "--port", "0",
                           "--model", "builtin-tiny", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
