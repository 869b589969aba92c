"""One server process shared by the server tests (compiling its buckets takes a while)."""

from __future__ import annotations

import pytest

from tests.serve.server import API_KEY, ServerProcess


@pytest.fixture(scope="package")
def server():
    proc = ServerProcess("--api_key", API_KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="package")
def reference(builtin_model):
    """Offline greedy generation on the engine the server runs (same shapes)."""
    from fbjax.engine.engine import LLMEngine
    from fbjax.sched.request import SamplingParams
    from tests.conftest import engine_config

    engine = LLMEngine(engine_config(), loaded=builtin_model)
    cache = {}

    def greedy(prompt: str, max_tokens: int):
        key = (prompt, max_tokens)
        if key not in cache:
            cache[key] = engine.generate([prompt], SamplingParams(max_tokens=max_tokens,
                                                                  temperature=0.0))[0]
        return cache[key]

    greedy.engine = engine
    return greedy
