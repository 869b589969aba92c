"""Token sampling inside the compiled step: logit bias, penalties, greedy, temperature,
top-k, top-p, min-p, and the log-probabilities a request may ask for.

Runs on device so only one int per sequence comes back to the host.

Why no sort: a full sort of the vocabulary is the textbook way to apply top-k and
top-p, but XLA's CPU sort costs milliseconds for a batch (more than the whole model
step of a small model). Instead each row's cut-off *probability* is found by
bisection: top-k keeps ``p >= t`` for the largest ``t`` with at least k tokens above
it; top-p keeps ``p >= t`` for the largest ``t`` whose kept mass reaches top_p (the
smallest nucleus, as in the sorted definition; ties at the boundary are kept).
Then one uniform number per row inverts the CDF of the kept tokens. A batch with no
sampled row skips all of it (``lax.cond``) and pays only an argmax.

Each row's key is ``fold_in(key(seed), output_index)``, so a seeded request draws the
same tokens whatever else shares its batches and however its prompt was chunked.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbjax.sched.request import MAX_LOGPROBS

# float32 probabilities: 40 halvings of [0, 1] resolve gaps down to ~1e-12.
BISECTION_STEPS = 40


def _bisect_threshold(probs: jax.Array, enough) -> jax.Array:
    """Largest t in [0, max p] with ``enough(kept mask p >= t)`` true, per row."""
    lo = jnp.zeros(probs.shape[0], probs.dtype)
    hi = probs.max(axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = enough(probs >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, body, (lo, hi))
    # hi itself (the max, or a point found sufficient) may qualify exactly.
    return jnp.where(enough(probs >= hi[:, None]), hi, lo)


def apply_logit_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """``logits`` [S, V] with ``values`` [S, B] added at token ``ids`` [S, B] (OpenAI's
    ``logit_bias``; unused entries add 0 to token 0)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].add(values.astype(logits.dtype))


def apply_penalties(logits: jax.Array, output_counts: jax.Array, prompt_seen: jax.Array,
                    presence: jax.Array, frequency: jax.Array, repetition: jax.Array
                    ) -> jax.Array:
    """``logits`` [S, V] penalized as vLLM does, in its order (after the logit bias,
    before temperature): the repetition penalty [S] on every token of the prompt or the
    output (a positive logit divided by it, another multiplied, as transformers'
    ``RepetitionPenaltyLogitsProcessor``), then OpenAI's ``frequency`` x the token's count
    in the output and ``presence`` x whether it occurs there. ``output_counts`` [S, V]
    int32, ``prompt_seen`` [S, V] bool."""
    seen = prompt_seen | (output_counts > 0)
    scale = jnp.where(seen, repetition[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / scale, logits * scale)
    counts = output_counts.astype(logits.dtype)
    return (logits - frequency[:, None] * counts
            - presence[:, None] * (output_counts > 0).astype(logits.dtype))


def filter_probs(logits, temperature, top_k, top_p, min_p=None) -> jax.Array:
    """Temperature-scaled probabilities with top-k, top-p then min-p applied
    (unnormalized). Min-p keeps tokens of at least ``min_p`` x the most likely one's
    probability; the filters never drop the most likely token, so the order does not
    change what min-p keeps."""
    vocab = logits.shape[-1]
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    probs = jax.nn.softmax(logits / safe_t[:, None], axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    t_k = _bisect_threshold(probs, lambda kept: kept.sum(axis=-1) >= k)
    probs = jnp.where(probs >= t_k[:, None], probs, 0.0)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    t_p = _bisect_threshold(
        probs, lambda kept: jnp.where(kept, probs, 0.0).sum(axis=-1) >= top_p)
    t_p = jnp.where(top_p >= 1.0, 0.0, t_p)  # float32 mass can reach 1 before the tail ends
    probs = jnp.where(probs >= t_p[:, None], probs, 0.0)
    if min_p is not None:
        floor = min_p * probs.max(axis=-1)
        probs = jnp.where(probs >= floor[:, None], probs, 0.0)
    return probs


def _sample_filtered(logits, temperature, top_k, top_p, seeds, output_index, min_p):
    probs = filter_probs(logits, temperature, top_k, top_p, min_p)
    cdf = jnp.cumsum(probs, axis=-1)

    def uniform(seed, index):
        return jax.random.uniform(jax.random.fold_in(jax.random.key(seed), index))

    u = jax.vmap(uniform)(seeds, output_index) * cdf[:, -1]
    choice = jnp.sum(cdf <= u[:, None], axis=-1)
    # Float round-off can put u at the very top: fall back to the last kept token.
    last_kept = logits.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.minimum(choice, last_kept).astype(jnp.int32)


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, seeds: jax.Array, output_index: jax.Array,
                  min_p: jax.Array | None = None) -> jax.Array:
    """logits [S, V] float32 -> token ids [S] int32; ``temperature == 0`` rows are greedy."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: _sample_filtered(logits, temperature, top_k, top_p, seeds, output_index,
                                 min_p),
        lambda: greedy,
    )
    return jnp.where(temperature > 0, sampled, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, num_logprobs: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the model's distribution (before temperature and filters,
    as vLLM and OpenAI report them): of each row's sampled token [S], and the
    ``MAX_LOGPROBS`` most likely tokens' ids and log-probabilities [S, MAX_LOGPROBS]
    (always that many, so no request's choice recompiles a bucket).
    Rows with ``num_logprobs < 0`` asked for none; a batch where none did skips the
    work (``lax.cond``) and returns zeros."""
    rows = logits.shape[0]
    k = min(MAX_LOGPROBS, logits.shape[-1])

    return jax.lax.cond(jnp.any(num_logprobs >= 0),
                        lambda: _logprobs_of(logits, tokens, k),
                        lambda: _no_logprobs(rows, k))


def prompt_token_logprobs(logits_of: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, vocab_size: int
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``token_logprobs`` for every token of the step whose ``targets`` >= 0 (the next
    prompt token): ``logits_of(hidden)`` [T, V] is computed only in steps that hold such
    a token (``lax.cond``), so scoring costs nothing to the steps that do not score."""
    k = min(MAX_LOGPROBS, vocab_size)
    return jax.lax.cond(
        jnp.any(targets >= 0),
        lambda: _logprobs_of(logits_of(hidden), jnp.maximum(targets, 0), k),
        lambda: _no_logprobs(hidden.shape[0], k))


def _logprobs_of(logits: jax.Array, tokens: jax.Array, k: int):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_ids.astype(jnp.int32), top_lp


def _no_logprobs(rows: int, k: int):
    return (jnp.zeros(rows, jnp.float32), jnp.zeros((rows, k), jnp.int32),
            jnp.zeros((rows, k), jnp.float32))
