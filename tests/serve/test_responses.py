"""The OpenAI body shapes of fbjax.serve.responses, to the key (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace

from fbjax.serve.responses import ChatBodies, CompletionBodies

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
         "prompt_tokens_details": {"cached_tokens": 0}}


def fake_generation():
    return SimpleNamespace(final_texts=["ab", "cd"], finish_reasons=["stop", "length"],
                           num_choices=2, usage=lambda: USAGE)


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
