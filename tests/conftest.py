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


# Under pytest-xdist (``-n``) tests are spread over workers by group: one group per
# module, so a module's fixtures (a server process, a compiled engine) are built once,
# except the kernel conformance suite, whose cases are independent and numerous enough
# to be spread one by one.
SPREAD_MODULES = {"tests.kernels.test_conformance"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__ if item.module else item.nodeid
        if module not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
