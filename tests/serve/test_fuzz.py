"""Fuzzed request bodies against the real server: never a 5xx, errors are OpenAI-shaped.

Bodies are drawn with hypothesis from the server's own OpenAPI schema: every property
of each endpoint's request model, present or absent, holding a value of its declared
type, an edge value of that type, or any JSON at all; plus raw bodies that are not
JSON objects. ``max_tokens`` stays small or wrong so valid requests finish quickly.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.server import API_KEY

finite = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10)

EDGES = {
    "integer": st.integers(-3, 20) | st.sampled_from([2**31, 2**63, -2**63, 2**64 + 1]),
    "number": st.floats(-3, 3, allow_nan=False) | st.sampled_from([0.0, 1e308, -1e-308]),
    "string": st.text(max_size=30),
    "boolean": st.booleans(),
}
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | st.text(max_size=5),
     "content": st.text(max_size=40) | st.none()
     | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=9)}),
                max_size=2)}), max_size=3)
SPECIAL = {
    "max_tokens": st.integers(-2, 6) | st.text(max_size=3) | finite,
    "max_completion_tokens": st.integers(-2, 6) | st.booleans(),
    "n": st.integers(-1, 3) | st.just(2**40),
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 400), max_size=8)
    | st.lists(st.text(max_size=8), max_size=3) | json_values,
    "messages": MESSAGES | json_values,
    "model": st.sampled_from(["fbjax-builtin-tiny", "nope"]) | st.none(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
}


def _value(name: str, prop: dict):
    if name in SPECIAL:
        return SPECIAL[name]
    types = [t.get("type") for t in prop.get("anyOf", [prop])]
    typed = [EDGES[t] for t in types if t in EDGES]
    return st.one_of(*typed, json_values) if typed else json_values


def _bodies(schema: dict, model: str):
    props = schema["components"]["schemas"][model]["properties"]
    fields = {name: _value(name, prop) for name, prop in props.items()}
    # max_tokens is always drawn so that a valid body never generates for long.
    required = {"max_tokens": fields.pop("max_tokens")}
    return st.fixed_dictionaries(required, optional=fields)


@pytest.fixture(scope="module")
def schema(server):
    return httpx.get(server.url + "/openapi.json").json()


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert {"type", "param", "code"} <= set(err)


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.mark.parametrize("path, model", [("/v1/completions", "CompletionRequest"),
                                         ("/v1/chat/completions", "ChatCompletionRequest")])
def test_fuzzed_bodies_never_5xx(server, schema, path, model):
    client = httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})

    @FUZZ
    @given(_bodies(schema, model))
    def run(body):
        _check(client.post(path, json=body))

    run()
    client.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=60) | json_values.map(lambda v: httpx.Request(
    "POST", "/", json=v).content),
       content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_raw_bodies_never_5xx(server, raw, content_type):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    for path in ("/v1/completions", "/v1/chat/completions"):
        _check(httpx.post(server.url + path, content=raw, headers=headers, timeout=60))
