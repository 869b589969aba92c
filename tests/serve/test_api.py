"""The server through the official openai client and raw HTTP: results, streaming,
usage, parameters, errors, /metrics, /load."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.serve.server import API_KEY, metric

MODEL = "fbjax-builtin-tiny"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def test_completion_is_offline_greedy_with_right_usage(client, reference):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = reference(PROMPT, 12)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == MODEL and out.object == "text_completion"


def test_streamed_completion_equals_non_streamed_for_a_seed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95,
              seed=1234, extra_body={"top_k": 40})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert "\ufffd" not in text or "\ufffd" in full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])


def test_chat_streamed_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hello there"}],
              max_tokens=10, temperature=0.7, seed=7)
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_uses_the_simple_template(client, reference):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0)
    ref = reference("<|user|>\nHi\n<|assistant|>\n", 6)
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_async_client_streams_concurrently(server, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        prompts = [f"{PROMPT} {i}" for i in range(6)]

        async def one(p):
            stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        async def chat():
            out = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                temperature=0)
            return out.choices[0].message.content

        texts = await asyncio.gather(*(one(p) for p in prompts), chat())
        await client.close()
        return prompts, texts

    prompts, texts = asyncio.run(main())
    assert texts[:-1] == [reference(p, 8).text for p in prompts]
    assert texts[-1] == reference("<|user|>\nHi\n<|assistant|>\n", 6).text


def test_n_choices_and_prompt_batches(client):
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=4,
                                    temperature=1.0, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL, prompt="cd", max_tokens=4,
                                       temperature=1.0, seed=6)
    assert out.choices[3].text == single.choices[0].text  # choice j uses seed + j
    assert out.usage.completion_tokens == 16


@pytest.mark.parametrize("width", [1, 2])
def test_stop_string_ends_text_and_never_leaks_into_the_stream(client, width):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0)
    for seed in range(20):  # sampled text varies; find a seed with a usable stop string
        full = client.completions.create(seed=seed, **kw).choices[0].text
        stops = [full[i:i + width] for i in range(2, len(full) - width)
                 if "\ufffd" not in full[i:i + width] and full.find(full[i:i + width]) >= 2]
        if stops:
            break
    stop = stops[0]
    expected = full[:full.find(stop)]
    out = client.completions.create(seed=seed, stop=stop, **kw)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        seed=seed, stop=[stop], stream=True, **kw))
    assert streamed == expected
    # Greedy output here repeats one character: the stop string matches at once.
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    stop="FF", stream=True)
    assert "".join(c.choices[0].text for c in out) == ""


def test_token_id_prompt(client, reference):
    ref = reference(PROMPT, 5)
    out = client.completions.create(model=MODEL, prompt=ref.prompt_token_ids, max_tokens=5,
                                    temperature=0)
    assert out.choices[0].text == ref.text


def test_models_health_load(http):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/v1/models/other").status_code == 404
    assert http.get("/health").json() == {"status": "ok"}
    load = http.get("/load").json()
    assert load["scheduler"] == "sarathi" and load["kv_total_pages"] == 512
    assert {"num_running", "num_waiting", "kv_free_pages", "load_estimate"} <= set(load)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b'{"prompt": "x", "temperature": NaN}', 422, "temperature"),
    (b'[1, 2]', 422, None),
    ({"prompt": 5}, 422, "prompt.str"),
    ({"prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x" * 600}, 413, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "x", "n": 100}, 400, "n"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    ({"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "repetition_penalty": 2.5}, 400, "repetition_penalty"),
    ({"prompt": "x", "stop_token_ids": [100000]}, 400, "stop_token_ids"),
    ({"prompt": [999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "slo_ttft_ms": -5}, 400, "slo_ttft_ms"),
])
def test_bad_input_is_an_openai_error(http, body, status, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = http.post("/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_completion_logprobs_streamed_and_not(client):
    """Legacy logprobs: one entry per generated token, greedy tokens on top of their
    alternatives (up to logprobs + 1 with the sampled one), the same values streamed."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    full = client.completions.create(**kw)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == full.usage.completion_tokens
    assert "".join(lp.tokens) == full.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 4
        assert top[token] == value == max(top.values())  # greedy: the most likely token
    chunks = list(client.completions.create(stream=True, **kw))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs
                for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == full.choices[0].text


def test_echo_scores_a_text_as_generation_did(client, reference):
    """How evaluation harnesses score a continuation: echo, max_tokens 0, logprobs. The
    scores of a greedy continuation, read back this way, are those generation gave."""
    ref = reference(PROMPT, 6)
    generated = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                          temperature=0, logprobs=0)
    ids = list(ref.prompt_token_ids) + list(ref.token_ids)
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                       logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert scored.usage.completion_tokens == 0 and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[-6:] == pytest.approx(
        generated.choices[0].logprobs.token_logprobs, abs=1e-5)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True,
                                      temperature=0)
    assert plain.choices[0].text.startswith(PROMPT) and plain.choices[0].logprobs is None
    assert plain.usage.completion_tokens == 3


def test_logit_bias_and_min_p(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0)
    plain = client.completions.create(**kw)
    forced = client.completions.create(logit_bias={"77": 100}, **kw)
    assert len(set(forced.choices[0].logprobs.tokens)) == 1
    assert forced.choices[0].text != plain.choices[0].text
    hot = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.5,
                                    seed=4, extra_body={"min_p": 1.0})
    assert hot.choices[0].text == plain.choices[0].text  # min_p 1: only the top token


def test_penalties_and_stop_token_ids(client, reference):
    """presence_penalty and frequency_penalty (OpenAI's) and repetition_penalty and
    stop_token_ids (vLLM's extras) reach the engine: each answer is the offline engine's
    under the same SamplingParams, and the penalties change the greedy text."""
    from fbjax.sched.request import SamplingParams

    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    plain = reference(PROMPT, 12)
    assert client.completions.create(**kw).choices[0].text == plain.text
    for fields in ({"presence_penalty": 1.5, "frequency_penalty": 1.0},
                   {"repetition_penalty": 1.8}):
        text = client.completions.create(extra_body=fields, **kw).choices[0].text
        want = reference.engine.generate([PROMPT], SamplingParams(
            max_tokens=12, temperature=0.0, **fields))[0].text
        assert text == want != plain.text, fields
    stop_id = plain.token_ids[3]
    out = client.completions.create(extra_body={"stop_token_ids": [stop_id]}, **kw).choices[0]
    want = reference.engine.generate([PROMPT], SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop" and out.text == want.text
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Say it again"}],
                max_tokens=16, temperature=0)
    plain_chat = client.chat.completions.create(**chat).choices[0].message.content
    penalized = client.chat.completions.create(presence_penalty=2, frequency_penalty=2,
                                               extra_body={"repetition_penalty": 2}, **chat)
    assert penalized.choices[0].message.content != plain_chat


def test_chat_logprobs_and_top_logprobs(client, http):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
              temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob == entry.logprob >= entry.top_logprobs[1].logprob
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)
    for fields, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                          ({"top_logprobs": 2}, "top_logprobs")):
        r = http.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}], **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_bad_chat_input(http):
    r = http.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 422
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user"}], "tools": [{}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.parametrize("fields, status, param", [
    ({"model": "gpt-4", "temperature": -1}, 404, "model"),  # the model is checked first
    ({"temperature": -1, "stop": [""]}, 400, "temperature"),
    ({"n": 100}, 400, "n"),
    ({"stop": ["x"] * 17}, 400, "stop"),
    ({"slo_tpot_ms": 0}, 400, "slo_tpot_ms"),
    ({"presence_penalty": -2.5}, 400, "presence_penalty"),
    ({"repetition_penalty": -1}, 400, "repetition_penalty"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10_000}, 400, "max_tokens"),
])
def test_chat_and_completions_share_their_checks(http, fields, status, param):
    """Both endpoints run one validation path: the same body errs the same way."""
    answers = [http.post("/v1/completions", json={"prompt": "x", **fields}),
               http.post("/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "x"}], **fields})]
    for r in answers:
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param
    assert answers[0].json()["error"]["type"] == answers[1].json()["error"]["type"]


def test_api_key_is_checked(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.base_url + "/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert httpx.get(server.url + "/metrics").status_code == 200  # open without a key


def test_metrics_parse_and_move(server, client):
    before = httpx.get(server.url + "/metrics").text
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3, temperature=0)
    after = httpx.get(server.url + "/metrics").text
    done = {"finish_reason": "length"}
    assert metric(after, "fbjax_requests_total", done) == \
        metric(before, "fbjax_requests_total", done) + 1
    assert metric(after, "fbjax_generation_tokens_total") == \
        metric(before, "fbjax_generation_tokens_total") + 3
    assert metric(after, "fbjax_time_to_first_token_seconds_count") > \
        metric(before, "fbjax_time_to_first_token_seconds_count")
    assert metric(after, "fbjax_step_time_seconds_total", {"phase": "prefill"}) > 0
    assert metric(after, "fbjax_kv_cache_total_pages") == 512
    assert metric(after, "fbjax_server_info", {"scheduler": "sarathi"}) == 1
    for name in ("fbjax_inter_token_latency_seconds_count",
                 "fbjax_time_per_output_token_seconds_count", "fbjax_preemptions_total",
                 "fbjax_num_requests_running", "fbjax_num_requests_waiting",
                 "fbjax_kv_cache_usage_ratio"):
        metric(after, name)
    assert any(line.startswith("fbjax_step_duration_seconds_count{bucket=")
               for line in after.splitlines())


def test_repeated_prompt_reports_cached_tokens_and_hit_metrics(server, client):
    """Prefix caching is on by default: a prompt sent again is served from the cache (its
    full 16-token pages, never its last token), usage says so as OpenAI does, the
    output is unchanged, and /metrics counts the hits."""
    prompt = "A long shared system prompt, repeated by every request of a chat app. " * 2
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    before = httpx.get(server.url + "/metrics").text
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    after = httpx.get(server.url + "/metrics").text
    prompt_tokens = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16
    assert again.choices[0].text == first.choices[0].text
    hits = metric(after, "fbjax_prefix_cache_hits_total") - \
        metric(before, "fbjax_prefix_cache_hits_total")
    queries = metric(after, "fbjax_prefix_cache_queries_total") - \
        metric(before, "fbjax_prefix_cache_queries_total")
    assert hits == again.usage.prompt_tokens_details.cached_tokens
    assert queries == 2 * prompt_tokens
    assert 0 < metric(after, "fbjax_prefix_cache_hit_rate") <= 1


def test_raw_sse_format(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3,
                                                       "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    for ln in lines[:-1]:
        json.loads(ln[len("data: "):])
