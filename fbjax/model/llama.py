"""Llama-family decoder in Flax over one ragged mixed batch and a paged KV cache.

Written with **flax.linen**, not nnx: an inference engine wants parameters as a plain
pytree argument of a pure function, because every token bucket is lowered and compiled
ahead of time with the params and the donated KV cache as inputs, sharded with
``jax.sharding`` and checkpointed with orbax as they are. Linen gives exactly that
(``model.apply({"params": p}, ...)``); nnx would add a split/merge at every step for no
gain here.

Covered: RMSNorm, RoPE (default, linear, llama3 scaling), grouped-query attention,
SwiGLU MLP, tied embeddings, Qwen2-style q/k/v bias, optional sliding window. Module
and parameter names follow Hugging Face's so weight conversion is a rename + transpose.

The batch is one flat token axis holding prefill chunks and decode tokens of many
sequences; ``AttentionMetadata`` describes how they map to sequences and cache pages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from fbjax_kernels.ragged_paged_attention import write_kv

from fbjax.config import ModelConfig
from fbjax.model.rope import apply_rope, inverse_frequencies

KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: (k, v) [pages, page, kv_heads, dim]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where each flat token sits: its position, its cache slot, its sequence.

    ``slot_mapping`` of padding tokens points past the pool (the write is dropped);
    padding sequences have ``kv_lens == 0`` and an empty query range in ``cu_q_lens``.
    """

    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32
    kv_lens: jax.Array  # [S] int32, context length including this step's tokens
    page_indices: jax.Array  # [S, pages_per_seq] int32
    cu_q_lens: jax.Array  # [S + 1] int32
    num_seqs: jax.Array  # [] int32


def _dense(features: int, name: str, bias: bool, dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, name=name, dtype=dtype, param_dtype=dtype,
                    kernel_init=nn.initializers.normal(0.02))


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return weight * xf.astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    attention_fn: Callable
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv, meta: AttentionMetadata):
        cfg = self.config
        tokens = x.shape[0]
        bias = cfg.attention_bias
        q = _dense(cfg.num_heads * cfg.head_dim, "q_proj", bias, self.dtype)(x)
        k = _dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", bias, self.dtype)(x)
        v = _dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", bias, self.dtype)(x)
        q = q.reshape(tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, meta.positions, inv_freq)
        k = apply_rope(k, meta.positions, inv_freq)
        k_cache, v_cache = write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        out = self.attention_fn(
            q, k_cache, v_cache, meta.kv_lens, meta.page_indices, meta.cu_q_lens,
            meta.num_seqs, sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window,
        )
        out = out.reshape(tokens, cfg.num_heads * cfg.head_dim)
        return _dense(cfg.hidden_size, "o_proj", False, self.dtype)(out), (k_cache, v_cache)


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, "gate_proj", False, self.dtype)(x)
        up = _dense(cfg.intermediate_size, "up_proj", False, self.dtype)(x)
        return _dense(cfg.hidden_size, "down_proj", False, self.dtype)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention_fn: Callable
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv, meta: AttentionMetadata):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, kv = Attention(cfg, self.attention_fn, self.dtype, name="self_attn")(h, kv, meta)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(cfg, self.dtype, name="mlp")(h), kv


class LlamaForCausalLM(nn.Module):
    """``__call__`` runs the decoder; ``logits`` projects chosen rows to the vocabulary."""

    config: ModelConfig
    attention_fn: Callable
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = [DecoderLayer(cfg, self.attention_fn, self.dtype)
                       for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", False, self.dtype)

    def __call__(self, tokens: jax.Array, kv_cache: KVCache, meta: AttentionMetadata):
        """Hidden states [T, hidden] after the final norm, and the updated cache."""
        x = self.embed_tokens(tokens)
        new_cache = []
        for layer, kv in zip(self.layers, kv_cache, strict=True):
            x, kv = layer(x, kv, meta)
            new_cache.append(kv)
        return self.norm(x), tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_all(self, tokens, kv_cache, meta):
        """Touches every parameter (decoder and head) so ``init`` creates them all."""
        hidden, _ = self(tokens, kv_cache, meta)
        return self.logits(hidden)
