"""Model weights: HF checkpoints in, orbax checkpoints in and out, seeded random init.

* :func:`load_hf_config` reads a local Hugging Face directory's ``config.json`` (Llama,
  Mistral and Qwen2 architectures) into a :class:`~fbjax.config.ModelConfig`. Both the
  older layout (``rope_theta`` and ``rope_scaling`` at the top level) and the one
  ``transformers`` 5 writes (a ``rope_parameters`` dict holding ``rope_theta`` and
  ``rope_type``) are understood. Features the Flax model does not implement (another
  activation, MLP or output-projection biases, per-layer sliding windows, RoPE types
  other than default/linear/llama3) are refused with a :class:`ConfigError` rather than
  loaded into a model that would silently compute something else.
* :func:`load_hf_params` reads ``*.safetensors`` (one file or shards listed in
  ``model.safetensors.index.json``) with the numpy API of ``safetensors`` (bfloat16 comes
  back as an ``ml_dtypes`` array, so no torch is needed) and renames/transposes HF
  tensors into the linen tree of :class:`~fbjax.model.llama.LlamaForCausalLM`.
* :func:`save_params` / :func:`restore_params` use orbax, so converted (or sharded)
  params can be reloaded without going through safetensors again.
* :func:`load_model` is what the engine calls: ``None`` (or ``builtin-tiny``) gives the
  built-in tiny model with seeded random weights and a byte tokenizer, a known name its
  packaged file (:mod:`fbjax.catalog`), a directory an HF model, a ``.gguf`` file a
  llama.cpp model (:mod:`fbjax.model.gguf`).

Nothing here downloads anything: a model is a local file, a local directory, a file in
an installed package, or the built-in one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbjax.catalog import resolve_model
from fbjax.config import ConfigError, ModelConfig, read_json
from fbjax.model.gguf import (
    TensorFetch,
    is_gguf_file,
    load_gguf_config,
    load_gguf_params,
    open_gguf,
)
from fbjax.model.llama import AttentionMetadata, LlamaForCausalLM
from fbjax.model.rope import inverse_frequencies
from fbjax.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from fbjax.resources import BUILTIN_MODEL_CONFIG

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings")

Params = dict[str, Any]


# --------------------------------------------------------------------------- config


def _check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ConfigError(f"model path not found: {path}")
    if not path.is_dir():
        raise ConfigError(f"model path is not a directory: {path} (expected a local "
                          "Hugging Face model directory with config.json, or a .gguf file)")
    return path


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a local HF model directory (its ``config.json``).

    ``eos_token_ids`` merges ``eos_token_id`` of ``config.json`` with that of
    ``generation_config.json`` (chat models often list their end-of-turn token only in
    the latter), in that order and without duplicates.
    """
    model_dir = _check_model_dir(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"config.json not found in model directory {model_dir}")
    cfg = read_json(path)

    model_type = _model_type(cfg, path)
    missing = [f for f in _REQUIRED_FIELDS if cfg.get(f) is None]
    if missing:
        raise ConfigError(f"{path}: missing required field(s) {missing}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias", False):
        raise ConfigError(f"{path}: mlp_bias=true is not supported")

    if model_type == "qwen2":
        attention_bias = True  # Qwen2: q/k/v biases, none on o_proj
    else:
        attention_bias = bool(cfg.get("attention_bias", False))
        if attention_bias:
            # Llama's attention_bias also puts a bias on o_proj, which the model lacks.
            raise ConfigError(f"{path}: attention_bias=true is not supported for "
                              f"{model_type} (it adds an o_proj bias); only Qwen2-style "
                              "q/k/v biases are")

    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim")
    if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        if hidden % heads:
            raise ConfigError(f"{path}: hidden_size ({hidden}) is not a multiple of "
                              f"num_attention_heads ({heads}) and head_dim is not given")
        head_dim = hidden // heads
    # (non-integer sizes are reported by ModelConfig's own checks below)
    rope_theta, rope_scaling = _rope(cfg, path)
    sliding_window = _sliding_window(cfg, model_type, path)
    bos_token_id = _optional_int(cfg.get("bos_token_id"), "bos_token_id", path)
    eos_token_ids = _eos_ids(cfg, model_dir, path)
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0:
        raise ConfigError(f"{path}: rms_norm_eps must be a positive number, got {eps!r}")

    try:
        config = ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=cfg["max_position_embeddings"],
            rms_norm_eps=float(eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            sliding_window=sliding_window,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            name=model_dir.resolve().name,
        )
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise ConfigError(f"{path}: {e}") from None
    try:
        inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad rope scaling parameters {config.rope_scaling}: "
                          f"{e!r}") from None
    return config


def _model_type(cfg: dict[str, Any], path: Path) -> str:
    archs = cfg.get("architectures")
    if isinstance(archs, str):
        archs = [archs]
    if archs:
        for arch in archs:
            if arch in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[arch]
        raise ConfigError(f"{path}: unsupported architecture {archs} (supported: "
                          f"{sorted(SUPPORTED_ARCHITECTURES)})")
    model_type = cfg.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise ConfigError(f"{path}: unsupported model_type {model_type!r} and no supported "
                      f"architectures (supported: {sorted(SUPPORTED_ARCHITECTURES)})")


def _rope(cfg: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the old or the transformers-5 layout."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{path}: rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{path}: rope_scaling must be an object, got {scaling!r}")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: rope_theta must be a number, got {theta!r}") from None
    if not scaling:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    return theta, scaling


def _sliding_window(cfg: dict[str, Any], model_type: str, path: Path) -> int | None:
    """The window, applied to every layer; HF semantics: key j visible to query i
    iff ``i - window < j <= i``, the same as the attention kernels'.

    Llama has none; Mistral uses ``sliding_window`` whenever it is set; Qwen2 only when
    ``use_sliding_window`` is true, and then only on layers >= ``max_window_layers``,
    which this model can represent only when that is every layer or none.
    """
    if model_type == "llama" or not cfg.get("use_sliding_window", model_type == "mistral"):
        return None
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if not isinstance(window, int) or window <= 0:
        raise ConfigError(f"{path}: sliding_window must be a positive integer, got {window!r}")
    layers = cfg["num_hidden_layers"]
    if model_type == "qwen2":
        types = cfg.get("layer_types")
        if types is None:
            first = cfg.get("max_window_layers", layers)
            types = ["full_attention" if i < first else "sliding_attention"
                     for i in range(layers)]
        if all(t == "full_attention" for t in types):
            return None
        if not all(t == "sliding_attention" for t in types):
            raise ConfigError(f"{path}: a sliding window on only some layers ({types}) is "
                              "not supported")
    return window


def _optional_int(value: Any, field: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {field} must be an integer, got {value!r}")
    return value


def _int_list(value: Any, field: str, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [_optional_int(v, field, path) for v in values]


def _eos_ids(cfg: dict[str, Any], model_dir: Path, path: Path) -> tuple[int, ...]:
    ids = _int_list(cfg.get("eos_token_id"), "eos_token_id", path)
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        ids += _int_list(gen.get("eos_token_id"), "eos_token_id", gen_path)
    return tuple(dict.fromkeys(ids))


# --------------------------------------------------------------------------- safetensors


def _hf_tensor_map(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], tuple, bool]]:
    """(HF name, linen path, HF shape, transpose) for every tensor the model needs."""
    h, hd = config.hidden_size, config.head_dim
    q, kv, inter = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), (config.vocab_size, h), False
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            in_features = q if proj == "o_proj" else h
            yield (f"{hf}.self_attn.{proj}.weight", (ours, "self_attn", proj, "kernel"),
                   (out, in_features), True)
            if config.attention_bias and proj != "o_proj":
                yield (f"{hf}.self_attn.{proj}.bias", (ours, "self_attn", proj, "bias"),
                       (out,), False)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)),
                            ("down_proj", (h, inter))):
            yield f"{hf}.mlp.{proj}.weight", (ours, "mlp", proj, "kernel"), shape, True
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{hf}.{norm}.weight", (ours, norm, "weight"), (h,), False
    yield "model.norm.weight", ("norm", "weight"), (h,), False
    if not config.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), (config.vocab_size, h), True


def _safetensors_index(model_dir: Path) -> tuple[dict[str, Path], str]:
    """HF tensor name -> file holding it, and a description of where we looked."""
    from safetensors import safe_open

    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index_path}: missing or malformed 'weight_map'")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for name, file in files.items():
            if not file.is_file():
                raise ConfigError(f"{index_path}: tensor {name!r} is mapped to {file.name}, "
                                  f"which does not exist in {model_dir}")
        return files, str(index_path)
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"no *.safetensors weights found in {model_dir}")
    files = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="np") as f:
                for name in f.keys():
                    files.setdefault(name, shard)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ConfigError(f"{shard}: cannot read safetensors file: {e}") from None
    return files, ", ".join(s.name for s in shards)


def assemble_params(config: ModelConfig, fetch: TensorFetch,
                    dtype: Any = jnp.float32) -> Params:
    """The linen param tree of ``config``'s model, each tensor from ``fetch(hf_name,
    hf_shape)`` (which returns it in the HF layout, shape checked).

    Every weight format (safetensors, GGUF) goes through here, so the HF-name-to-tree
    mapping and the transposes exist once: HF ``nn.Linear`` weights are ``[out, in]``,
    Flax ``Dense`` kernels ``[in, out]``.
    """
    params: Params = {}
    for hf_name, tree_path, shape, transpose in _hf_tensor_map(config):
        array = fetch(hf_name, shape)
        if transpose:
            array = array.T
        node = params
        for key in tree_path[:-1]:
            node = node.setdefault(key, {})
        node[tree_path[-1]] = jnp.asarray(array, dtype=dtype)
    return params


def load_hf_params(model_dir: str | Path, config: ModelConfig,
                   dtype: jnp.dtype = jnp.float32) -> Params:
    """The linen param tree of ``config``'s model from a directory of safetensors.

    Tensors the model does not use (e.g. ``lm_head.weight`` of a tied model, rotary
    buffers of old exports) are ignored. Returns ``{"embed_tokens": ..., "layers_0":
    ..., ...}``: pass it as ``model.apply({"params": params}, ...)``.
    """
    from safetensors import safe_open

    model_dir = _check_model_dir(model_dir)
    files, where = _safetensors_index(model_dir)
    handles: dict[Path, Any] = {}

    def fetch(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        file = files.get(hf_name)
        if file is None:
            raise ConfigError(f"tensor {hf_name!r} not found in {model_dir} "
                              f"(looked in {where})")
        if file not in handles:
            try:
                handles[file] = safe_open(str(file), framework="np").__enter__()
            except Exception as e:
                raise ConfigError(f"{file}: cannot read safetensors file: {e}") from None
        try:
            array = handles[file].get_tensor(hf_name)
        except Exception:
            raise ConfigError(f"tensor {hf_name!r} not found in {file}") from None
        if tuple(array.shape) != shape:
            raise ConfigError(f"tensor {hf_name!r} in {file} has shape "
                              f"{tuple(array.shape)}, expected {shape} from config.json")
        return array

    try:
        return assemble_params(config, fetch, dtype)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


# --------------------------------------------------------------------------- random init


def dummy_inputs(config: ModelConfig, dtype: jnp.dtype = jnp.float32):
    """A one-token batch over a one-page cache: enough for ``model.init`` to trace."""
    cache = tuple((jnp.zeros((1, 1, config.num_kv_heads, config.head_dim), dtype),) * 2
                  for _ in range(config.num_layers))
    meta = AttentionMetadata(
        positions=jnp.zeros((1,), jnp.int32),
        slot_mapping=jnp.zeros((1,), jnp.int32),
        kv_lens=jnp.ones((1,), jnp.int32),
        page_indices=jnp.zeros((1, 1), jnp.int32),
        cu_q_lens=jnp.array([0, 1], jnp.int32),
        num_seqs=jnp.array(1, jnp.int32),
    )
    return jnp.zeros((1,), jnp.int32), cache, meta


def init_random_params(config: ModelConfig, dtype: jnp.dtype = jnp.float32,
                       seed: int | None = None) -> Params:
    """Seeded random params (normal(0.02) weights, unit norms) for ``config``.

    ``lazy_init`` creates the params from abstract inputs, so the forward pass is only
    traced, never run or compiled. The random bits come from ``jax.random``'s
    counter-based PRNG and are the same on every backend, so a seed names the same
    model everywhere (the float scaling of those bits may differ by an ulp).
    """
    from fbjax_kernels.ragged_paged_attention import reference_attention

    seed = config.seed if seed is None else seed
    model = LlamaForCausalLM(config, reference_attention, dtype)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      dummy_inputs(config, dtype))
    variables = model.lazy_init(jax.random.PRNGKey(seed), *abstract,
                                method=LlamaForCausalLM.init_all)
    return variables["params"]


# --------------------------------------------------------------------------- orbax


def save_params(params: Params, path: str | Path, *, force: bool = False) -> Path:
    """Write ``params`` as an orbax checkpoint at ``path`` and wait until it is complete.

    ``force`` overwrites an existing checkpoint (orbax refuses by default).
    """
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()  # orbax wants absolute paths
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params, force=force)
        checkpointer.wait_until_finished()
    return path


def restore_params(path: str | Path, target: Params | None = None) -> Params:
    """Read params written by :func:`save_params`.

    ``target`` (a tree of arrays or ``jax.ShapeDtypeStruct`` with shardings) restores
    onto those shardings and dtypes; without it the arrays land on the default device.
    """
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if target is not None:
        target = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


# --------------------------------------------------------------------------- entry point


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: its shape, its weights, and how to turn text into ids."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer


def load_model(model: str | Path | None, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """``None`` or ``builtin-tiny``: the built-in tiny model (random weights, byte
    tokenizer); a known name (:mod:`fbjax.catalog`): its file; a path: a GGUF file (see
    :mod:`fbjax.model.gguf`) or a local HF directory with config.json, *.safetensors and
    tokenizer.json."""
    model = resolve_model(model)
    if model is None:
        config = ModelConfig.from_json(BUILTIN_MODEL_CONFIG)
        return LoadedModel(config, init_random_params(config, dtype), ByteTokenizer())
    if is_gguf_file(model):
        from fbjax.model.gguf_tokenizer import gguf_tokenizer

        gguf = open_gguf(model)
        config = load_gguf_config(gguf)
        return LoadedModel(config, load_gguf_params(gguf, config, dtype),
                           gguf_tokenizer(gguf))
    model_dir = _check_model_dir(model)
    config = load_hf_config(model_dir)
    tokenizer = HFTokenizer.from_dir(model_dir, config.eos_token_ids, config.bos_token_id)
    if not config.eos_token_ids and tokenizer.eos_token_ids:
        config = dataclasses.replace(config, eos_token_ids=tokenizer.eos_token_ids)
    return LoadedModel(config, load_hf_params(model_dir, config, dtype), tokenizer)


__all__ = [
    "LoadedModel", "assemble_params", "dummy_inputs", "init_random_params", "load_hf_config",
    "load_hf_params", "load_model", "restore_params", "save_params", "SUPPORTED_ARCHITECTURES",
]
