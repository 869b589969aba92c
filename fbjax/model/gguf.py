"""GGUF files (llama.cpp's single-file format): the model config and weights.

A ``.gguf`` file holds everything a model needs: its shape as metadata keys
(``<arch>.block_count``, ``<arch>.embedding_length``, ...), its tokenizer
(``tokenizer.ggml.*``, read by :mod:`fbjax.model.gguf_tokenizer`), its chat template and
its tensors, often block-quantized. It is read with llama.cpp's own reader,
:class:`gguf.GGUFReader`, and every tensor is dequantized once, at load time, into the
engine's dtype: the model runs on dense weights, so a quantized file saves disk and
download, not accelerator memory.

Two layout differences from a Hugging Face checkpoint are undone here:

* ggml lists a tensor's dimensions fastest-first, so ``[in, out]`` in the metadata is
  numpy's ``[out, in]`` (the HF ``nn.Linear`` layout); the reader already returns the
  numpy order and :func:`fbjax.model.weights.assemble_params` does the rest, as for
  safetensors.
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` (and their biases)
  of Llama-style models so that its RoPE rotates adjacent pairs; HF rotates the two
  halves of each head. :func:`unpermute_rows` restores the HF order (Qwen2 files are not
  permuted).

Nothing here imports JAX (the router reads tokenizers from GGUF files without it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fbjax.config import ConfigError, ModelConfig

GGUF_MAGIC = b"GGUF"
#: ``general.architecture`` values the Llama-family model can run.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
#: Architectures whose q/k rows llama.cpp's converter permutes (``LlamaModel.permute``).
_PERMUTED_ARCHITECTURES = ("llama", "mistral")
#: Tensor types dequantized at load (each checked in tests/test_gguf.py). Q5_0/Q5_1/Q8_0
#: belong here with the K-quants: llama.cpp's K-quant mixes fall back to them for rows
#: that are not a multiple of 256 (SmolLM2's 576, Qwen2-0.5B's 896). gguf-py decodes
#: more (the IQ and TQ families), but those are refused until tested.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# HF module path (inside ``model.layers.N.``) -> llama.cpp tensor name (inside ``blk.N.``).
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# Read into the config rather than the param tree.
_CONFIG_TENSORS = ("rope_freqs.weight",)

_REQUIRED = object()

#: ``fetch(hf_name, hf_shape) -> array`` in the HF layout: how a weight format hands its
#: tensors to :func:`fbjax.model.weights.assemble_params`.
TensorFetch = Callable[[str, tuple[int, ...]], np.ndarray]


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file: a ``.gguf`` name, or a file starting with the
    magic (so a renamed download still loads)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class GGUFFile:
    """An opened GGUF file: metadata look-ups that name the missing key and the file, and
    its tensors dequantized on request. Use :func:`open_gguf` (cached) to get one."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path = path
        self.reader = reader
        self.tensors = {t.name: t for t in reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of metadata ``key`` (a str, number, bool or list); ``default`` when
        absent, or a :class:`ConfigError` naming the key if no default is given."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.path}: missing GGUF metadata field {key!r}")
            return default
        try:
            return field.contents()
        except Exception as e:  # bad UTF-8, a malformed array
            raise ConfigError(f"{self.path}: cannot read GGUF metadata field {key!r}: "
                              f"{e}") from None

    def length(self, key: str) -> int | None:
        """The number of elements of array field ``key`` without decoding them."""
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)

    def dims(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape in numpy (HF) order: ggml's dimensions reversed."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32, in numpy (HF) order."""
        from gguf.quants import dequantize

        tensor = self._tensor(name)
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ConfigError(f"{self.path}: tensor {name!r} has type {kind}, which fbjax "
                              f"cannot load (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
            return np.asarray(array, np.float32).reshape(self.dims(name))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{self.path}: cannot dequantize tensor {name!r} ({kind}, "
                              f"ggml shape {tensor.shape.tolist()}): {e}") from None

    def _tensor(self, name: str) -> Any:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ConfigError(f"tensor {name!r} not found in {self.path}")
        return tensor


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file (a :class:`ConfigError` if it is missing, truncated or not GGUF).

    Parsing a file's metadata takes seconds (a vocabulary is ~100k strings), and a
    server reads the same file for its weights, its tokenizer and its chat template, so
    the last files opened are cached while unchanged on disk.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"model path not found: {path}")
    if not path.is_file():
        raise ConfigError(f"GGUF model path is not a file: {path}")
    stat = path.stat()
    return _open_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    from gguf import GGUFReader

    del mtime_ns  # part of the cache key only
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ...
        raise ConfigError(f"{path}: cannot read GGUF file ({size} bytes): {e!s} -- the "
                          "file is truncated, corrupt or not GGUF") from None
    file = GGUFFile(Path(path), reader)
    split = file.get("split.count", 1)
    if split != 1:
        raise ConfigError(f"{path}: one of {split} split GGUF files; merge them first "
                          "(llama-gguf-split --merge)")
    return file


# --------------------------------------------------------------------------- config


def load_gguf_config(model: str | Path | GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` stated by a GGUF file's metadata.

    The vocabulary size is the embedding's row count (llama.cpp pads the token list to
    it); embeddings are tied when there is no ``output.weight``; the ids that end a
    sequence are ``tokenizer.ggml.eos_token_id`` and the end-of-turn/-message ids
    (``eot``/``eom``) when given, as llama.cpp stops on all of them.
    """
    f = model if isinstance(model, GGUFFile) else open_gguf(model)
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{f.path}: unsupported architecture {arch!r} in "
                          f"general.architecture (supported: {', '.join(GGUF_ARCHITECTURES)})")

    def key(name: str, default: Any = _REQUIRED) -> Any:
        return f.get(f"{arch}.{name}", default)

    heads = _per_layer(f, f"{arch}.attention.head_count", key("attention.head_count"))
    kv_heads = _per_layer(f, f"{arch}.attention.head_count_kv",
                          key("attention.head_count_kv", heads))
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", None)
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads
    if key("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{f.path}: {arch}.attention.value_length differs from "
                          "key_length; the model needs equal key and value head sizes")
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ConfigError(f"{f.path}: {arch}.rope.dimension_count ({rotary}) is not the head "
                          f"size ({head_dim}); partial rotary embeddings are not supported")
    vocab_size, embed_dim = f.dims("token_embd.weight")
    if embed_dim != hidden:
        raise ConfigError(f"{f.path}: token_embd.weight has {embed_dim} columns but "
                          f"{arch}.embedding_length is {hidden}")
    n_tokens = f.length("tokenizer.ggml.tokens")
    if n_tokens is not None and n_tokens > vocab_size:
        raise ConfigError(f"{f.path}: tokenizer.ggml.tokens lists {n_tokens} tokens but the "
                          f"embedding has only {vocab_size} rows")
    _refuse_unsupported_tensors(f)
    eps = key("attention.layer_norm_rms_epsilon")
    window = key("attention.sliding_window", None) if arch == "mistral" else None
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=key("context_length"),
            rms_norm_eps=float(eps),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(f, arch, head_dim),
            tie_word_embeddings="output.weight" not in f.tensors,
            attention_bias="blk.0.attn_q.bias" in f.tensors,
            sliding_window=window or None,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=tuple(i for i in gguf_eos_token_ids(f) if i < vocab_size),
            name=f.path.name.removesuffix(".gguf"),
        )
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise ConfigError(f"{f.path}: {e}") from None


def _per_layer(f: GGUFFile, key: str, value: Any) -> Any:
    """A head count, which llama.cpp may store per layer: one value if all agree."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ConfigError(f"{f.path}: {key} differs between layers ({value}); the model "
                              "needs the same count in every layer")
        return value[0]
    return value


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int) -> dict[str, Any] | None:
    """Linear scaling from ``rope.scaling.*`` (or the older ``rope.scale_linear``), or
    llama.cpp's per-frequency divisors (``rope_freqs.weight``, how its converter stores
    Llama 3's scaling)."""
    kind = f.get(f"{arch}.rope.scaling.type", None)
    factor = f.get(f"{arch}.rope.scaling.factor", None)
    if kind is None and f.has(f"{arch}.rope.scale_linear"):
        kind, factor = "linear", f.get(f"{arch}.rope.scale_linear")
    scaling: dict[str, Any] | None = None
    if kind == "linear" and factor not in (None, 1.0):
        scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind not in (None, "none", "linear"):
        raise ConfigError(f"{f.path}: {arch}.rope.scaling.type {kind!r} is not supported "
                          "(supported: none, linear)")
    if "rope_freqs.weight" in f.tensors:
        factors = f.read("rope_freqs.weight").reshape(-1)
        if scaling is not None or factors.shape != (head_dim // 2,):
            raise ConfigError(f"{f.path}: rope_freqs.weight of shape {factors.shape} with "
                              f"scaling {scaling} is not supported (expected "
                              f"{head_dim // 2} divisors and no other scaling)")
        scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in factors]}
    return scaling


def gguf_eos_token_ids(f: GGUFFile) -> tuple[int, ...]:
    """The ids llama.cpp stops on: end of sequence, of turn and of message, when given."""
    ids = [f.get(f"tokenizer.ggml.{name}_token_id", None) for name in ("eos", "eot", "eom")]
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))


def _refuse_unsupported_tensors(f: GGUFFile) -> None:
    """Tensors the model has no place for (an ``attn_output`` or MLP bias, extra norms)
    mean the file computes something else: refuse rather than ignore them."""
    wanted = set(_GLOBAL_TENSORS.values()) | set(_CONFIG_TENSORS)
    for hf in _LAYER_TENSORS.values():
        wanted.add(f"{hf}.weight")
    for proj in ("attn_q", "attn_k", "attn_v"):
        wanted.add(f"{proj}.bias")
    extra = sorted(name for name in f.tensors
                   if (name.split(".", 2)[2] if name.startswith("blk.") else name)
                   not in wanted)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ConfigError(f"{f.path}: tensors {extra[:5]}{more} have no place in the "
                          "Llama-family model fbjax runs")


# --------------------------------------------------------------------------- weights


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for the HF tensor ``hf_name`` (``model.layers.3.mlp.up_proj.weight``
    -> ``blk.3.ffn_up.weight``)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_TENSORS[module]}.{kind}"


def unpermute_rows(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of a q/k weight or bias: per head, its rows
    were reordered from HF's two halves to interleaved pairs."""
    head_half = array.shape[0] // num_heads // 2
    return (array.reshape(num_heads, head_half, 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


def gguf_fetcher(f: GGUFFile, config: ModelConfig) -> TensorFetch:
    """``fetch(hf_name, hf_shape)`` for :func:`fbjax.model.weights.assemble_params`: the
    tensor dequantized, checked against the shape the config implies, and un-permuted."""
    permuted = f.get("general.architecture") in _PERMUTED_ARCHITECTURES

    def fetch(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        name = gguf_tensor_name(hf_name)
        dims = f.dims(name)
        if dims != shape:
            raise ConfigError(f"tensor {name!r} in {f.path} has shape {dims} (numpy order), "
                              f"expected {shape} from the metadata")
        array = f.read(name)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            array = unpermute_rows(array, heads)
        return array

    return fetch


def load_gguf_params(model: str | Path | GGUFFile, config: ModelConfig,
                     dtype: Any = "float32") -> dict[str, Any]:
    """The linen param tree of ``config``'s model from a GGUF file, dequantized to
    ``dtype`` (the same tree :func:`fbjax.model.weights.load_hf_params` returns)."""
    from fbjax.model.weights import assemble_params

    f = model if isinstance(model, GGUFFile) else open_gguf(model)
    return assemble_params(config, gguf_fetcher(f, config), dtype)


__all__ = [
    "GGUFFile", "GGUF_ARCHITECTURES", "SUPPORTED_TENSOR_TYPES", "TensorFetch",
    "gguf_eos_token_ids",
    "gguf_fetcher",
    "gguf_tensor_name", "is_gguf_file", "load_gguf_config", "load_gguf_params", "open_gguf",
    "unpermute_rows",
]
