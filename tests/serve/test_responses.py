"""The OpenAI body shapes of fbjax.serve.responses, to the key (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace

from fbjax.sched.request import TokenLogprob
from fbjax.serve.responses import ChatBodies, CompletionBodies

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
         "prompt_tokens_details": {"cached_tokens": 0}}


def fake_generation(logprobs=None):
    """Two choices; with ``logprobs``, choice 0 asked for them and has these."""
    pending = list(logprobs or [])

    def take(i):
        out, pending[:] = list(pending), []
        return out

    tokenizer = SimpleNamespace(decode=lambda ids: "".join(chr(i) for i in ids))
    return SimpleNamespace(final_texts=["ab", "cd"], finish_reasons=["stop", "length"],
                           num_choices=2, usage=lambda: USAGE,
                           wants_logprobs=lambda i: logprobs is not None and i == 0,
                           take_logprobs=take, logprobs=[list(logprobs or []), []], echo=None,
                           state=SimpleNamespace(tokenizer=tokenizer))


# "a" then "b": "b" sampled though "c" was more likely (a sampled, not greedy, token).
TOKENS = [TokenLogprob(97, -0.1, ((97, -0.1), (99, -2.5))),
          TokenLogprob(98, -1.5, ((99, -0.4), (97, -1.2)))]


def test_completion_logprobs_format():
    b = CompletionBodies("m", fake_generation(TOKENS))
    assert b.final()["choices"][0]["logprobs"] == {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, -1.5],
        "top_logprobs": [{"a": -0.1, "c": -2.5}, {"c": -0.4, "a": -1.2, "b": -1.5}],
        "text_offset": [0, 1]}
    assert b.final()["choices"][1]["logprobs"] is None  # choice 1 did not ask
    assert b.chunk(0, "ab", None)["choices"][0]["logprobs"]["token_logprobs"] == [-0.1, -1.5]
    assert b.chunk(0, "", None)["choices"][0]["logprobs"]["tokens"] == []  # each sent once


def test_chat_logprobs_format():
    b = ChatBodies("m", fake_generation(TOKENS[1:]))
    assert b.final()["choices"][0]["logprobs"] == {"content": [
        {"token": "b", "logprob": -1.5, "bytes": [98],
         "top_logprobs": [{"token": "c", "logprob": -0.4, "bytes": [99]},
                          {"token": "a", "logprob": -1.2, "bytes": [97]}]}]}


def envelope(bodies, obj, choices, **usage):
    return {"id": bodies.id, "object": obj, "created": bodies.created, "model": "m",
            "choices": choices, **usage}


def test_completion_bodies():
    b = CompletionBodies("m", fake_generation())
    assert b.id.startswith("cmpl-") and b.opening() == []
    assert b.chunk(1, "x", None) == envelope(b, "text_completion", [
        {"index": 1, "text": "x", "logprobs": None, "finish_reason": None}])
    assert b.final() == envelope(b, "text_completion", [
        {"index": 0, "text": "ab", "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "text": "cd", "logprobs": None, "finish_reason": "length"}], usage=USAGE)
    with_usage = CompletionBodies("m", fake_generation(), include_usage=True)
    assert with_usage.chunk(0, "x", "stop")["usage"] is None
    assert with_usage.usage_chunk() == envelope(with_usage, "text_completion", [], usage=USAGE)


def test_chat_bodies():
    b = ChatBodies("m", fake_generation())
    assert b.id.startswith("chatcmpl-")
    assert b.opening() == [envelope(b, "chat.completion.chunk", [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}]) for i in range(2)]
    assert b.chunk(0, "x", None) == envelope(b, "chat.completion.chunk", [
        {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}])
    assert b.chunk(1, "", "length")["choices"][0]["delta"] == {}
    assert b.final() == envelope(b, "chat.completion", [
        {"index": 0, "message": {"role": "assistant", "content": "ab"}, "logprobs": None,
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "cd"}, "logprobs": None,
         "finish_reason": "length"}], usage=USAGE)
    with_usage = ChatBodies("m", fake_generation(), include_usage=True)
    assert with_usage.opening()[0]["usage"] is None
    assert with_usage.usage_chunk() == envelope(with_usage, "chat.completion.chunk", [],
                                                usage=USAGE)
