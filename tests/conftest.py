"""Shared fixtures: the built-in model loaded once, small engines built from it."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Profiles measured on this machine (in the user's cache) must not stand in for the
# committed ones the tests expect; tests that write profiles point this elsewhere.
os.environ["FBJAX_PROFILE_DIR"] = tempfile.mkdtemp(prefix="fbjax-test-profiles-")

from fbjax.config import BucketConfig, CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402

# Small ladders keep start-up compilation short in tests while still mixing buckets.
TEST_BUCKETS = BucketConfig(token_buckets=(16, 32, 64, 128), seq_buckets=(4, 16))


def engine_config(**overrides) -> EngineConfig:
    base = EngineConfig(
        buckets=TEST_BUCKETS,
        cache=CacheConfig(page_size=16, num_pages=512),
        max_model_len=512,
        scheduler=SchedulerConfig(policy="vllm", max_num_batched_tokens=64),
        show_progress=False,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def builtin_model():
    import jax.numpy as jnp

    from fbjax.model.weights import load_model

    return load_model(None, jnp.float32)


@pytest.fixture(scope="module")
def engine(builtin_model):
    from fbjax.engine.engine import LLMEngine

    return LLMEngine(engine_config(), loaded=builtin_model)


# Under pytest-xdist (``-n``) tests are spread over workers by module, so a module's
# fixtures (a server process, a compiled engine, a reproduction run) are built once,
# except the kernel conformance suite, whose cases are independent and numerous enough
# to be spread one by one. This is a scheduler of our own, not ``xdist_group`` marks:
# with pytest >= 9 node ids are structured and xdist 3.8's ``--dist loadgroup`` no
# longer sees the group suffix it writes, so every group was silently split across
# workers (each building the module fixtures again).
SPREAD_FILES = {"tests/kernels/test_conformance.py"}


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (pyproject's addopts) by test file, SPREAD_FILES by test."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in SPREAD_FILES else path

    return ByModule(config, log)
