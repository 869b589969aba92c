"""End-to-end tests of the real engine on the built-in model (CPU, float32)."""

from __future__ import annotations

import dataclasses
import random

import jax
import numpy as np
import pytest

from fbjax.config import BucketConfig, CacheConfig, SchedulerConfig
from fbjax.engine.engine import InvalidRequestError, LLMEngine
from fbjax.engine.penalties import PenaltySlots
from fbjax.sched.request import SamplingParams
from tests.conftest import engine_config

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def random_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(32, 127) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def record_plans(engine: LLMEngine) -> list:
    """Wrap the scheduler so the test sees every plan the engine ran."""
    plans = []
    schedule = engine.scheduler.schedule

    def spy(now):
        plan = schedule(now)
        plans.append([(c.request.request_id, c.num_tokens, c.completes, c.start)
                      for c in plan.chunks])
        return plan

    engine.scheduler.schedule = spy
    return plans


def test_batch_invariance(engine):
    """Greedy output alone == output when chunk-prefilled inside mixed batches."""
    prompts = random_prompts(16, 3, 150, seed=1)
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    plans = record_plans(engine)
    try:
        together = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    finally:
        del engine.scheduler.schedule
    assert together == alone
    # The batched run really mixed decodes with prefill chunks, and chunked prompts.
    mixed = [p for p in plans if any(start > 0 and n == 1 for _, n, _, start in p)
             and any(n > 1 for _, n, _, _ in p)]
    assert mixed, "no step mixed decodes with prefill chunks"
    assert any(n > 1 and not done for p in plans for _, n, done, _ in p), "no prompt chunked"
    assert engine.kv.num_free_pages == engine.kv.num_pages


def test_zero_recompiles_after_warmup(engine):
    events = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    rng = random.Random(7)
    steps = 0
    while steps < 200:
        while engine.scheduler.num_running + engine.scheduler.num_waiting < rng.randint(1, 20):
            prompt = random_prompts(1, 1, 200, seed=rng.randrange(10**6))[0]
            sampling = SamplingParams(max_tokens=rng.randint(1, 30),
                                      temperature=rng.choice([0.0, 0.7, 1.3]),
                                      top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]),
                                      repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
                                      frequency_penalty=rng.choice([0.0, 0.5]))
            engine.add_request(prompt, sampling)
        engine.step()
        steps += 1
    while engine.has_unfinished_requests():
        engine.step()
    assert events == [], f"compiled after warm-up: {events}"
    # The listener does see compilations: a fresh jit must register.
    jax.jit(lambda x: x * 3 + 1)(np.arange(5))
    assert events, "compile listener never fired; the zero-recompile check is blind"
    assert engine.kv.num_free_pages == engine.kv.num_pages


def test_kv_pressure_preempts_and_finishes(builtin_model, engine):
    prompts = random_prompts(8, 50, 70, seed=3)
    sampling = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(prompts, sampling)]
    tight = LLMEngine(engine_config(cache=CacheConfig(page_size=16, num_pages=24),
                                    buckets=BucketConfig((16, 32, 64), (4, 8)),
                                    max_model_len=256),
                      loaded=builtin_model)
    outputs = tight.generate(prompts, sampling)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 40 for o in outputs)
    assert sum(o.num_preemptions for o in outputs) > 0, "pool was never short: test is void"
    assert [o.token_ids for o in outputs] == expected  # recompute reproduces the tokens
    assert tight.kv.num_free_pages == tight.kv.num_pages


def test_seeded_sampling_reproducible_alone_and_batched(engine):
    prompts = random_prompts(6, 5, 90, seed=11)
    seeded = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=100 + i,
                             ignore_eos=True) for i in range(6)]
    batched = [o.token_ids for o in engine.generate(prompts, seeded)]
    alone = [engine.generate([p], s)[0].token_ids for p, s in zip(prompts, seeded, strict=True)]
    assert batched == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, seed=999, ignore_eos=True)
    assert engine.generate([prompts[0]], other_seed)[0].token_ids != alone[0]


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    prompt = random_prompts(1, 20, 20, seed=5)[0]
    greedy = engine.generate([prompt], GREEDY)[0].token_ids
    top1 = SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    nucleus = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3,
                             ignore_eos=True)
    assert engine.generate([prompt], top1)[0].token_ids == greedy
    assert engine.generate([prompt], nucleus)[0].token_ids == greedy


def test_stop_token_ids_and_stop_strings(engine):
    prompt = random_prompts(1, 10, 10, seed=9)[0]
    free = SamplingParams(max_tokens=40, temperature=1.0, seed=42, ignore_eos=True)
    full = engine.generate([prompt], free)[0]
    stop_at = next(i for i, t in enumerate(full.token_ids) if i >= 2 and 32 <= t < 127)
    stop_id = full.token_ids[stop_at]
    first = full.token_ids.index(stop_id)
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=1.0, seed=42,
                                                   ignore_eos=True,
                                                   stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:first + 1]
    stop_str = chr(stop_id)
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=1.0, seed=42,
                                                   ignore_eos=True, stop=(stop_str,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop_str)]
    assert stop_str not in out.text


def test_abort_frees_pages(engine):
    rid = engine.add_request(random_prompts(1, 100, 100, seed=4)[0],
                             SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.num_free_pages < engine.kv.num_pages
    assert engine.abort_request(rid)
    assert engine.kv.num_free_pages == engine.kv.num_pages
    assert not engine.has_unfinished_requests()
    aborted = engine.pop_finished(rid)
    assert aborted.finish_reason == "abort" and aborted.finish_time is not None
    assert not engine.abort_request(rid)


@pytest.mark.parametrize("prompt, sampling, message", [
    ("", SamplingParams(), "prompt is empty"),
    ([], SamplingParams(), "prompt is empty"),
    ([5] * 600, SamplingParams(), "context"),
    ([5] * 500, SamplingParams(max_tokens=100), "context"),
    ([5, 100000], SamplingParams(), "vocabulary"),
    ([5], SamplingParams(logit_bias={100000: 1.0}), "logit_bias token id"),
])
def test_bad_requests_are_clear_errors(engine, prompt, sampling, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, sampling)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {5: 101.0}}, "logit_bias"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"presence_penalty": "1"}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logit_bias_steers_greedy_and_sampled_tokens(engine):
    prompt = random_prompts(1, 10, 40, seed=5)[0]
    plain = engine.generate([prompt], GREEDY)[0].token_ids
    banned = plain[0]
    forced = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                            logit_bias={77: 100.0})
    avoided = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                             logit_bias={t: -100.0 for t in set(plain)})
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True,
                             logit_bias={78: 100.0})
    # Batched with an unbiased request, which must not feel the others' biases.
    outs = engine.generate([prompt] * 4, [forced, avoided, sampled, GREEDY])
    assert outs[0].token_ids == [77] * 6
    assert banned not in outs[1].token_ids and not set(plain) & set(outs[1].token_ids)
    assert outs[2].token_ids == [78] * 6
    assert outs[3].token_ids == plain


def test_min_p_one_keeps_only_the_most_likely_token(engine):
    prompt = random_prompts(1, 10, 40, seed=6)[0]
    greedy = engine.generate([prompt], GREEDY)[0].token_ids
    hot = SamplingParams(max_tokens=10, temperature=1.5, seed=9, ignore_eos=True, min_p=1.0)
    assert engine.generate([prompt], hot)[0].token_ids == greedy


PENALIZED = [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=0.8,
                   frequency_penalty=0.6),
    SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True,
                   presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=0.8),
]


def test_penalties_are_batch_invariant(engine):
    """A penalized request gives the same tokens alone and beside other requests
    (penalized or not, chunk-prefilled or decoding), and requests without penalties
    are not touched by their neighbours' (so the slots never mix rows)."""
    prompts = random_prompts(6, 5, 90, seed=21)
    params = [*PENALIZED, GREEDY, *PENALIZED[:2]]
    alone = [engine.generate([p], s)[0].token_ids for p, s in zip(prompts, params, strict=True)]
    together = [o.token_ids for o in engine.generate(prompts, params)]
    assert together == alone
    plain = [engine.generate([p], GREEDY)[0].token_ids for p in prompts[:2]]
    assert [alone[0], alone[1]] != plain  # the penalties did something


def test_presence_and_frequency_pick_the_penalized_argmax(engine):
    """Greedy under presence/frequency penalties picks, at every step, the token whose
    log-probability minus its penalty (over the output so far) is largest. Checked from
    the returned raw log-probabilities: the 20 most likely tokens are known, and any
    other token has a log-probability below the 20th and a penalty >= 0."""
    prompt = random_prompts(1, 30, 30, seed=22)[0]
    presence, frequency = 0.7, 0.4
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=20,
                              presence_penalty=presence, frequency_penalty=frequency)
    out = engine.generate([prompt], sampling)[0]
    counts: dict[int, int] = {}

    def score(token: int, logprob: float) -> float:
        n = counts.get(token, 0)
        return logprob - frequency * n - presence * (n > 0)

    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        best = max(score(t, v) for t, v in lp.top)
        assert score(token, lp.logprob) >= max(best, lp.top[-1][1]) - 1e-4
        counts[token] = counts.get(token, 0) + 1
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert out.token_ids != engine.generate([prompt], plain)[0].token_ids


def test_penalties_through_prefix_cache_and_preemption(builtin_model, engine):
    """The counts come from the request's tokens, not from what a step computed: a prompt
    served from the prefix cache, and requests preempted and recomputed under KV pressure
    whose slots are taken back now and then (rebuilt from the tokens so far when lent
    again), sample what they sample alone."""
    prompts = random_prompts(8, 50, 70, seed=23)
    params = [dataclasses.replace(PENALIZED[i % 3] if i % 4 else GREEDY, max_tokens=40)
              for i in range(8)]
    alone = [engine.generate([p], s)[0] for p, s in zip(prompts, params, strict=True)]
    again = engine.generate([prompts[1]], params[1])[0]
    assert again.num_cached_tokens > 0 and again.token_ids == alone[1].token_ids
    tight = LLMEngine(engine_config(cache=CacheConfig(page_size=16, num_pages=24),
                                    buckets=BucketConfig((16, 32, 64), (4,)),
                                    max_model_len=256),
                      loaded=builtin_model)
    inits = []
    init = tight.runner.init_penalty_slot
    tight.runner.init_penalty_slot = lambda slot, *a: (inits.append(slot), init(slot, *a))
    ids = [tight.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
    while tight.has_unfinished_requests():
        tight.step()
        if tight.num_steps % 7 == 0:  # every slot taken back
            tight.penalty_slots = PenaltySlots(tight.runner.num_penalty_slots)
    outputs = [tight.pop_finished(i) for i in ids]
    assert sum(o.num_preemptions for o in outputs) > 0, "pool was never short: test is void"
    assert [o.token_ids for o in outputs] == [o.token_ids for o in alone]
    assert len(inits) > sum(p.has_penalties for p in params), "no slot was lent twice"


def test_generate_is_all_or_nothing(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate([[256, 65, 66], []], GREEDY)
    assert not engine.has_unfinished_requests()


def test_unknown_scheduler_is_clear(builtin_model):
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        LLMEngine(engine_config(scheduler=SchedulerConfig(policy="nope")), loaded=builtin_model)
