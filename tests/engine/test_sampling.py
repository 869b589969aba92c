"""Sampling math: the sort-free top-k/top-p filter against the sorted definition; the
penalties and their per-slot token counts against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbjax.engine.penalties import (
    PenaltySlots,
    count_sampled,
    init_slot,
    init_slot_args,
    make_penalty_state,
    penalize,
)
from fbjax.engine.sampling import apply_logit_bias, apply_penalties, filter_probs, sample_tokens
from fbjax.sched.request import Request, SamplingParams


def sorted_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """The textbook definition: sort, keep top-k, renormalize, keep the smallest
    prefix whose mass reaches top_p."""
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, dtype=bool)
    k = len(probs) if top_k <= 0 else min(top_k, len(probs))
    keep[order[:k]] = True
    p = np.where(keep, probs, 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    return keep & nucleus


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9),
                                          (10, 0.7), (3, 0.2), (0, 1e-6), (400, 0.95)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_filter_matches_sorted_definition(top_k, top_p, temperature):
    rng = np.random.default_rng(top_k * 31 + int(top_p * 100) + int(temperature * 7))
    logits = rng.normal(size=(8, 320)).astype(np.float32) * 3
    kept = np.asarray(filter_probs(jnp.asarray(logits), jnp.full(8, temperature),
                                   jnp.full(8, top_k, jnp.int32), jnp.full(8, top_p)))
    for row in range(8):
        expected = sorted_filter(logits[row].astype(np.float64), temperature, top_k, top_p)
        np.testing.assert_array_equal(kept[row] > 0, expected, err_msg=f"row {row}")


def test_sampling_follows_the_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    n = 8000
    logits = jnp.asarray(np.log(probs))[None].repeat(n, 0)
    tokens = np.asarray(jax.jit(sample_tokens)(
        logits, jnp.ones(n), jnp.zeros(n, jnp.int32), jnp.ones(n),
        jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32)))
    freq = np.bincount(tokens, minlength=4) / n
    np.testing.assert_allclose(freq, probs, atol=0.02)


def test_greedy_rows_and_top_k_bounds():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 50)).astype(np.float32))
    temperature = jnp.where(jnp.arange(64) % 2 == 0, 0.0, 1.0)
    tokens = np.asarray(sample_tokens(logits, temperature, jnp.full(64, 3, jnp.int32),
                                      jnp.ones(64), jnp.arange(64, dtype=jnp.uint32),
                                      jnp.zeros(64, jnp.int32)))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    greedy = np.argmax(np.asarray(logits), axis=-1)
    for row in range(64):
        if row % 2 == 0:
            assert tokens[row] == greedy[row]
        else:
            assert tokens[row] in top3[row]


def test_same_seed_and_index_same_token():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 320)).astype(np.float32)).repeat(4, 0)
    seeds = jnp.array([7, 7, 8, 7], jnp.uint32)
    index = jnp.array([3, 3, 3, 4], jnp.int32)
    draws = [np.asarray(sample_tokens(logits, jnp.ones(4), jnp.zeros(4, jnp.int32),
                                      jnp.ones(4), seeds, index)) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert draws[0][0] == draws[0][1]


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_tokens_of_at_least_min_p_times_the_most_likely(min_p):
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(4, 200)).astype(np.float32) * 2
    kept = np.asarray(filter_probs(jnp.asarray(logits), jnp.ones(4), jnp.zeros(4, jnp.int32),
                                   jnp.ones(4), jnp.full(4, min_p)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = probs >= min_p * probs.max(-1, keepdims=True) * (1 - 1e-6)
    np.testing.assert_array_equal(kept > 0, expected)


def test_logit_bias_adds_at_its_tokens_only():
    logits = jnp.zeros((2, 10))
    ids = jnp.array([[3, 7, 0], [1, 0, 0]], jnp.int32)
    values = jnp.array([[5.0, -2.0, 0.0], [1.5, 0.0, 0.0]])
    out = np.asarray(apply_logit_bias(logits, ids, values))
    expected = np.zeros((2, 10), np.float32)
    expected[0, 3], expected[0, 7], expected[1, 1] = 5.0, -2.0, 1.5
    np.testing.assert_array_equal(out, expected)


def numpy_penalties(logits, prompt, output, presence, frequency, repetition):
    """One row penalized as vLLM's ``apply_penalties`` (token lists, not counts)."""
    out = logits.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    out[seen] = np.where(out[seen] > 0, out[seen] / repetition, out[seen] * repetition)
    counts = np.bincount(output, minlength=len(logits)) if output else np.zeros(len(logits))
    return out - frequency * counts - presence * (counts > 0)


PENALTY_ROWS = [  # prompt, output, presence, frequency, repetition
    ([3, 3, 9], [5, 5, 5, 2, 9], 0.5, 0.3, 1.3),
    ([1], [], 1.0, 1.0, 2.0),  # nothing generated yet: only the repetition penalty
    ([0, 4], [4, 7, 7], -2.0, 2.0, 0.5),  # negative presence, repetition < 1 rewards
    ([6], [6, 6], 0.0, 0.0, 1.0),  # all off
]


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(4)
    vocab = 12
    logits = rng.normal(size=(len(PENALTY_ROWS), vocab)).astype(np.float32) * 3
    logits[0, 9] = 0.0  # a zero logit is multiplied (stays 0)
    counts = np.zeros((len(PENALTY_ROWS), vocab), np.int32)
    seen = np.zeros((len(PENALTY_ROWS), vocab), bool)
    for i, (prompt, output, *_) in enumerate(PENALTY_ROWS):
        np.add.at(counts[i], output, 1)
        seen[i, prompt] = True
    presence, frequency, repetition = (np.array(col, np.float32)
                                       for col in list(zip(*PENALTY_ROWS, strict=True))[2:])
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts),
                                     jnp.asarray(seen), presence, frequency, repetition))
    for i, (prompt, output, p, f, r) in enumerate(PENALTY_ROWS):
        want = numpy_penalties(logits[i], prompt, output, p, f, r)
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6, err_msg=f"row {i}")
    np.testing.assert_array_equal(got[3], logits[3])


def _state_of(rows: dict[int, tuple[list[int], list[int]]], num_slots: int, vocab: int):
    """A penalty state with ``rows[slot] = (prompt, outputs)`` filled by init_slot."""
    state = make_penalty_state(num_slots, vocab)
    for slot, (prompt, output) in rows.items():
        state = init_slot(state, *init_slot_args(slot, prompt + output, len(prompt), 16))
    return state


def test_init_slot_counts_outputs_and_marks_the_prompt():
    state = _state_of({1: ([3, 3, 9], [5, 5, 3]), 0: ([2], [])}, num_slots=3, vocab=10)
    counts, seen = np.asarray(state.output_counts), np.asarray(state.prompt_seen)
    np.testing.assert_array_equal(counts[1], np.bincount([5, 5, 3], minlength=10))
    np.testing.assert_array_equal(np.flatnonzero(seen[1]), [3, 9])
    np.testing.assert_array_equal(np.flatnonzero(seen[0]), [2])
    assert not counts[0].any() and not counts[2].any() and not seen[2].any()
    # Re-lending a slot replaces its row.
    state = init_slot(state, *init_slot_args(1, [4, 6], 1, 16))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(state.output_counts)[1]), [6])
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(state.prompt_seen)[1]), [4])


def test_penalize_and_count_touch_only_rows_with_a_slot():
    """Rows without a slot keep their logits bit for bit and add no count; each row with
    one is penalized from its own slot, whatever row of the batch it is in."""
    rng = np.random.default_rng(5)
    vocab = 10
    state = _state_of({2: ([1, 4], [4, 8, 8]), 0: ([7], [3])}, num_slots=3, vocab=vocab)
    logits = jnp.asarray(rng.normal(size=(4, vocab)).astype(np.float32))
    slots = jnp.array([-1, 2, -1, 0], jnp.int32)
    presence, frequency = jnp.array([9.0, 0.4, 9.0, 1.0]), jnp.array([9.0, 0.2, 9.0, 0.0])
    repetition = jnp.array([9.0, 1.5, 9.0, 1.2])
    got = np.asarray(penalize(logits, state, slots, presence, frequency, repetition))
    np.testing.assert_array_equal(got[[0, 2]], np.asarray(logits)[[0, 2]])
    for row, (prompt, output) in ((1, ([1, 4], [4, 8, 8])), (3, ([7], [3]))):
        want = numpy_penalties(np.asarray(logits)[row], prompt, output, float(presence[row]),
                               float(frequency[row]), float(repetition[row]))
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-6)
    none = jnp.full(4, -1, jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(penalize(logits, state, none, presence, frequency, repetition)), logits)
    after = count_sampled(state, slots, jnp.array([5, 8, 6, 3], jnp.int32))
    delta = np.asarray(after.output_counts) - np.asarray(state.output_counts)
    expected = np.zeros_like(delta)
    expected[2, 8] = expected[0, 3] = 1
    np.testing.assert_array_equal(delta, expected)
    np.testing.assert_array_equal(after.prompt_seen, state.prompt_seen)


def _request(rid: str) -> Request:
    return Request(rid, [1, 2], SamplingParams(presence_penalty=1.0), 0.0)


def test_penalty_slots_lend_keep_free_and_take_back():
    slots = PenaltySlots(2)
    a, b, c = _request("a"), _request("b"), _request("c")
    got, fresh = slots.assign([a, b])
    assert got == {"a": 0, "b": 1} and fresh == [(0, a), (1, b)]
    assert slots.assign([b, a]) == ({"a": 0, "b": 1}, [])  # kept: no re-init
    # Full: c takes the slot of the least recently used request not sampling now.
    got, fresh = slots.assign([c, a])
    assert got == {"c": 1, "a": 0} and fresh == [(1, c)]
    got, fresh = slots.assign([b])  # b lost its slot: lent one again, re-initialized
    assert fresh == [(got["b"], b)] and got["b"] == 1
    c.status = a.status.FINISHED_STOPPED  # c holds nothing now; a finished frees its slot
    a.status = a.status.FINISHED_ABORTED
    got, fresh = slots.assign([c2 := _request("c2")])
    assert fresh == [(0, c2)]
    with pytest.raises(ValueError, match="penalty slots"):
        slots.assign([_request(x) for x in "xyz"])
