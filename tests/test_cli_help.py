"""The engine flags (model, dtype, scheduler, profile) show in ``--help`` of every CLI that
builds an engine, not only in ``--helpfull``."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["fbjax.generate", "fbjax.serve", "fbjax.profile"])
def test_help_lists_the_engine_flags(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr  # (absl's --help exits with 1)
    for flag in ("--model", "--dtype", "--scheduler", "--profile", "--[no]auto_profile",
                 "--token_buckets"):
        assert f"  {flag}:" in proc.stdout, (module, flag)
    assert "smollm2-135m-instruct" in proc.stdout  # the default model, named
