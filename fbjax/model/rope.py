"""Rotary position embeddings, including Llama 3 and linear frequency scaling.

``freq_factors`` scaling divides each frequency by its own factor: how llama.cpp's GGUF
files store Llama 3's scaling (the ``rope_freqs.weight`` tensor), which gives the same
frequencies as ``llama3`` without stating its parameters.

Frequencies are computed once in numpy float32 (as Hugging Face does) and folded into
the compiled step as constants; only ``positions * inv_freq`` is computed per step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbjax.config import ConfigError


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> np.ndarray:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if kind == "freq_factors":
        factors = np.asarray(scaling["factors"], np.float32)
        if factors.shape != inv_freq.shape:
            raise ConfigError(f"rope_scaling freq_factors: {factors.shape[0]} factors for "
                              f"{inv_freq.shape[0]} frequencies")
        return (inv_freq / factors).astype(np.float32)
    raise ConfigError(f"rope_scaling type {kind!r} is not supported "
                      "(supported: default, linear, llama3, freq_factors)")


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` [tokens, heads, head_dim] by its positions (half-split convention)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb)[:, None, :]
    sin = jnp.sin(emb)[:, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
