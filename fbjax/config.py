"""Plain configuration dataclasses, one per layer, loadable from JSON (``fbjax/configs``).

Pure Python (no JAX) so the scheduler and the simulator can share them.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the field or file."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2 with q/k/v bias)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"
    seed: int = 0  # used only for random (built-in or dummy) weights

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {field} must be a positive integer, "
                                  f"got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads ({self.num_heads}) must be a multiple "
                              f"of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        data = read_json(path)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return _construct(cls, data, str(path))


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``num_pages`` pages of ``page_size`` token slots each.

    ``enable_prefix_caching``: full pages are kept under a key of their tokens and
    reused by later requests with the same prefix (see ``sched.kv_cache``). On by
    default, as in vLLM and SGLang: outputs are unchanged (tested), and a request
    without a shared prefix only pays a dictionary look-up per page."""

    page_size: int = 16
    num_pages: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.num_pages <= 0:
            raise ConfigError("cache config: page_size and num_pages must be positive")


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """The two padding ladders: tokens per step x sequences per step.

    Every (tokens, seqs) pair with seqs <= tokens is compiled ahead of time; a step runs
    on the smallest pair that holds it (``pick``). The small rungs (4 and 8 tokens, one
    sequence) are for decoding one or a few requests: on CPU a (4, 1) step costs about
    half a (16, 4) one.
    """

    token_buckets: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    seq_buckets: tuple[int, ...] = (1, 4, 8, 16, 32)

    def __post_init__(self) -> None:
        for name in ("token_buckets", "seq_buckets"):
            ladder = tuple(getattr(self, name))
            if not ladder or any(b <= 0 for b in ladder) or list(ladder) != sorted(set(ladder)):
                raise ConfigError(f"bucket config: {name} must be strictly increasing "
                                  f"positive integers, got {ladder}")
            object.__setattr__(self, name, ladder)
        if self.seq_buckets[0] > self.token_buckets[-1]:
            raise ConfigError("bucket config: smallest seq bucket exceeds largest token bucket")

    @property
    def max_tokens(self) -> int:
        return self.token_buckets[-1]

    @functools.cached_property
    def max_seqs(self) -> int:
        # The largest seq bucket in a compiled pair (pairs need seqs <= tokens).
        return max(s for s in self.seq_buckets if s <= self.token_buckets[-1])

    def pairs(self) -> list[tuple[int, int]]:
        """Every bucket to compile: (tokens, seqs) with seqs <= tokens."""
        return [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]

    def pick(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """Smallest compiled bucket holding ``num_tokens`` tokens of ``num_seqs`` sequences."""
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs:
            raise ValueError(f"step of {num_tokens} tokens / {num_seqs} seqs exceeds the "
                             f"largest bucket ({self.max_tokens}, {self.max_seqs})")
        seqs = self.seq_buckets[bisect.bisect_left(self.seq_buckets, max(num_seqs, 1))]
        tokens = self.token_buckets[bisect.bisect_left(self.token_buckets,
                                                       max(num_tokens, seqs))]
        return tokens, seqs


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Which policy decides each step, and its step limits (default: the largest bucket).

    ``profile`` is a latency profile (a path or a name; see ``fbjax.profiling.store``).
    FairBatching needs one; without it the engine looks for ``<device>-<model>.json``
    among the known profiles and fails with an error naming ``--profile`` if there is
    none. A profile recorded on another device or for another model is refused unless
    ``force_profile``. With ``online_update`` the engine refines the profile from every
    measured step. With ``auto_profile`` (and no ``profile`` given) an engine that finds
    no profile of its device, model and buckets measures one after compiling (about a
    minute; see ``fbjax.profiling.measure.AUTO``) and saves it in the user's profile
    directory for the next start. The SLOs are FairBatching's defaults for requests that
    carry none.
    """

    policy: str = "vllm"
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    profile: str | None = None
    force_profile: bool = False
    online_update: bool = True
    auto_profile: bool = True
    ttft_slo_s: float = 3.0
    tpot_slo_s: float = 0.1
    anchor: str = "first_token"  # FairBatching envelope anchor: first_token | arrival


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; ``model=None`` means the built-in model."""

    model: str | None = None
    # auto: cpu_ffi on CPU, the Pallas kernel on GPU/TPU (pallas_gpu/pallas_tpu), else
    # reference; any name (e.g. "reference") selects that one. See fbjax_kernels.
    attention_impl: str = "auto"
    dtype: str = "float32"
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    buckets: BucketConfig = dataclasses.field(default_factory=BucketConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    compilation_cache_dir: str | None = "~/.cache/fbjax/jax"  # None disables it
    tensor_parallel: int = 1  # devices the weights and KV heads are split over
    show_progress: bool = True


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _construct(cls, data: dict[str, Any], source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
