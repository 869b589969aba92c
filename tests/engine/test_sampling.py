"""Sampling math: the sort-free top-k/top-p filter against the sorted definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbjax.engine.sampling import apply_logit_bias, filter_probs, sample_tokens


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
