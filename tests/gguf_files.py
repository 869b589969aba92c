"""Writing small GGUF files for the tests, the way llama.cpp's converter does.

Names come from gguf-py's own HF-to-GGUF table (``gguf.get_tensor_name_map``) and the
q/k rows of Llama-style models are permuted as ``LlamaModel.permute`` in
``convert_hf_to_gguf.py`` does, so the files test fbjax's reader against llama.cpp's
conventions rather than against its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
          "qwen2": gguf.MODEL_ARCH.QWEN2}


def llamacpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute``: each head's rows from two halves to interleaved pairs."""
    shape = weights.shape
    return (weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def model_metadata(arch: str, *, layers: int, hidden: int, inter: int, heads: int,
                   kv_heads: int, context: int = 256, eps: float = 1e-6,
                   theta: float = 10000.0) -> dict[str, Any]:
    return {f"{arch}.context_length": context, f"{arch}.block_count": layers,
            f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": inter,
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
            f"{arch}.attention.layer_norm_rms_epsilon": eps, f"{arch}.rope.freq_base": theta}


def gguf_tensors(hf: dict[str, np.ndarray], arch: str, heads: int, kv_heads: int,
                 qtype: Q = Q.F32, raw: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """GGUF name -> float32 array, or ``(bytes, type)`` for 2-D weights when ``qtype`` is
    not F32 (norms and biases stay F32, as llama.cpp keeps them). ``raw`` gives the
    stored bytes of some tensors directly (types gguf-py cannot quantize)."""
    layers = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("model.layers."))
    names = gguf.get_tensor_name_map(ARCHES[arch], layers)
    out: dict[str, Any] = {}
    for hf_name, array in hf.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        array = np.asarray(array, np.float32)
        if arch != "qwen2" and ("q_proj" in hf_name or "k_proj" in hf_name):
            array = llamacpp_permute(array, heads if "q_proj" in hf_name else kv_heads)
        if raw is not None and name in raw:
            out[name] = (raw[name], qtype)
        elif array.ndim == 2 and qtype != Q.F32:
            out[name] = (gguf.quants.quantize(array, qtype), qtype)
        else:
            out[name] = array
    return out


def write_gguf(path: Path, arch: str, metadata: dict[str, Any],
               tensors: dict[str, Any]) -> Path:
    """A GGUF file: ``metadata`` typed from the Python values (int: uint32, float:
    float32, lists as arrays), ``tensors`` as from :func:`gguf_tensors`."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            data, qtype = tensor
            if data.dtype == np.float16:  # gguf-py's "quantize" to F16 is a cast
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_hf_weights(rng: np.random.Generator, *, vocab: int, hidden: int, inter: int,
                      layers: int, heads: int, kv_heads: int, bias: bool = False,
                      tied: bool = False, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random weights under HF names and in HF layouts (``[out, in]``)."""
    head_dim = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, hidden),
           "model.norm.weight": 1 + w(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj, rows in (("q_proj", hidden), ("k_proj", kv_heads * head_dim),
                           ("v_proj", kv_heads * head_dim)):
            out[f"{p}.self_attn.{proj}.weight"] = w(rows, hidden)
            if bias:
                out[f"{p}.self_attn.{proj}.bias"] = w(rows)
        out[f"{p}.self_attn.o_proj.weight"] = w(hidden, hidden)
        out[f"{p}.mlp.gate_proj.weight"] = w(inter, hidden)
        out[f"{p}.mlp.up_proj.weight"] = w(inter, hidden)
        out[f"{p}.mlp.down_proj.weight"] = w(hidden, inter)
        out[f"{p}.input_layernorm.weight"] = 1 + w(hidden)
        out[f"{p}.post_attention_layernorm.weight"] = 1 + w(hidden)
    if not tied:
        out["lm_head.weight"] = w(vocab, hidden)
    return out


def llama3_rope_factors(head_dim: int, theta: float, p: dict[str, float]) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's converter computes it for Llama 3 scaling."""
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / p["low_freq_factor"], old / p["high_freq_factor"]
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(p["factor"])
        else:
            smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"]
                                                               - p["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(factors, np.float32)
