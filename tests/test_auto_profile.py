"""FairBatching on a model nobody profiled: the engine measures a profile after compiling,
saves it where the next start finds it, and the commands its errors suggest work."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys

import pytest

from fbjax.config import BucketConfig, SchedulerConfig
from fbjax.profiling import measure
from fbjax.profiling.store import ProfileNotFound, load_engine_profile, profile_command
from tests.conftest import engine_config

BUCKETS = BucketConfig(token_buckets=(16, 32), seq_buckets=(4,))
QUICK = measure.GridSettings(points_per_bucket=6, warmup=1, repeats=1, time_limit_s=30.0)


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    """An empty user profile dir, and no shipped profiles (one covers these buckets)."""
    from fbjax.profiling import store

    monkeypatch.setenv("FBJAX_PROFILE_DIR", str(tmp_path))
    monkeypatch.setattr(store, "PACKAGED_PROFILES_DIR", tmp_path / "none")
    return tmp_path


def fairbatching(**scheduler):
    return engine_config(buckets=BUCKETS, scheduler=SchedulerConfig(
        policy="fairbatching", max_num_batched_tokens=32, **scheduler))


def test_engine_measures_saves_and_reuses_a_profile(profile_dir, monkeypatch, builtin_model):
    from fbjax.engine.engine import LLMEngine
    from fbjax.sched.fairbatching import FairBatchingScheduler
    from fbjax.sched.request import SamplingParams

    monkeypatch.setattr(measure, "AUTO", QUICK)
    engine = LLMEngine(fairbatching(), loaded=builtin_model)
    assert isinstance(engine.scheduler, FairBatchingScheduler)
    assert engine.profile_path == profile_dir / "cpu-builtin-tiny.json"
    meta = json.loads(engine.profile_path.read_text())["metadata"]
    assert meta["source"] == "auto (engine start-up)"
    assert meta["buckets_profiled"] == [[16, 4], [32, 4]]
    assert meta["grid"]["measured"] >= 6 and "heldout_mape" in meta
    # It serves, and refines the measured profile online.
    out = engine.generate(["hello", "profile me"], SamplingParams(max_tokens=5,
                                                                  ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [5, 5]
    assert engine.latency.num_updates > 0
    # The next start finds it and measures nothing.
    monkeypatch.setattr(measure, "record_profile", lambda *a, **k: pytest.fail("re-measured"))
    again = LLMEngine(fairbatching(), loaded=builtin_model)
    assert again.profile_path == engine.profile_path


def test_without_auto_profile_the_error_names_a_command_that_works(profile_dir,
                                                                   builtin_model):
    from fbjax.engine.engine import LLMEngine

    with pytest.raises(ProfileNotFound) as info:
        LLMEngine(fairbatching(auto_profile=False), loaded=builtin_model)
    command = re.search(r"record one with `([^`]+)`", str(info.value)).group(1)
    assert command == profile_command(None, BUCKETS)
    assert "--model builtin-tiny" in command and "--token_buckets 16,32" in command
    # Run it (a short grid), then the engine finds the profile without measuring.
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "fbjax.profile"]
    proc = subprocess.run([sys.executable, *argv[1:], "--points_per_bucket", "4",
                           "--repeats", "1", "--num_pages", "512", "--max_model_len", "512"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert str(profile_dir / "cpu-builtin-tiny.json") in proc.stdout
    engine = LLMEngine(fairbatching(auto_profile=False), loaded=builtin_model)
    assert engine.profile_path == profile_dir / "cpu-builtin-tiny.json"


def test_a_default_profile_of_other_buckets_counts_as_missing(profile_dir):
    from tests.test_profile import synthetic_profile

    synthetic_profile(BucketConfig(token_buckets=(16,), seq_buckets=(4,))).save(
        profile_dir / "cpu-builtin-tiny.json")
    with pytest.raises(ProfileNotFound, match="--token_buckets 16,32"):
        load_engine_profile(None, device="cpu", model="builtin-tiny", buckets=BUCKETS)


def test_an_explicit_profile_is_never_replaced(profile_dir, builtin_model, monkeypatch):
    from fbjax.engine.engine import LLMEngine
    from tests.test_profile import synthetic_profile

    path = profile_dir / "mine.json"
    synthetic_profile(BucketConfig(token_buckets=(16,), seq_buckets=(4,))).save(path)
    monkeypatch.setattr(measure, "record_profile", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(ProfileNotFound, match="lacks 1 of the engine's 2 buckets"):
        LLMEngine(dataclasses.replace(fairbatching(), scheduler=dataclasses.replace(
            fairbatching().scheduler, profile=str(path))), loaded=builtin_model)
