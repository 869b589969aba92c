"""Token sampling inside the compiled step: greedy, temperature, top-k, top-p.

Runs on device so only one int per sequence comes back to the host. Each sequence's
random key is ``fold_in(key(seed), output_index)``: a seeded request draws the same
tokens whatever else shares its batches and however its prompt was chunked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, seeds: jax.Array, output_index: jax.Array) -> jax.Array:
    """logits [S, V] float32 -> token ids [S] int32."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_t[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
    keep &= before < top_p[:, None]  # the top token always survives
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(seed, index, row):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(seeds, output_index, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
