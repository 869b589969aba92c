"""absl flags shared by the CLIs that build an engine (generate, serve, profile)."""

from __future__ import annotations

from absl import flags

from fbjax.catalog import BUILTIN_MODEL, DEFAULT_MODEL, KNOWN_MODELS
from fbjax.config import BucketConfig, CacheConfig, ConfigError, EngineConfig, SchedulerConfig

flags.DEFINE_string("model", DEFAULT_MODEL, "A .gguf file, a local Hugging Face model "
                    f"directory, or a known name ({', '.join(KNOWN_MODELS)}; "
                    f"{BUILTIN_MODEL} is a random test model).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Weights, activations and KV cache dtype.")
flags.DEFINE_string("scheduler", "vllm", "Scheduling policy: vllm, sarathi, sarathi-edf "
                    "(Sarathi with prompts in TTFT-deadline order), fairbatching.")
flags.DEFINE_string("profile", None, "Latency profile (a path, or a name among the known "
                    "profiles); fairbatching defaults to <device>-<model>.json.")
flags.DEFINE_bool("auto_profile", True, "Without a latency profile for this device, model "
                  "and buckets, measure one after compiling (about a minute) and save it "
                  "for the next start (--noauto_profile: fail instead).")
flags.DEFINE_bool("force_profile", False, "Use a profile recorded on another device or for "
                  "another model anyway.")
flags.DEFINE_list("token_buckets", None, "Token-budget ladder, e.g. 16,32,64,128,256 "
                  "(default: EngineConfig's).")
flags.DEFINE_list("seq_buckets", None, "Sequences-per-step ladder, e.g. 4,8,16,32.")
flags.DEFINE_integer("max_num_batched_tokens", None, "Token budget per step "
                     "(default: the largest token bucket).")
flags.DEFINE_integer("page_size", CacheConfig.page_size, "KV cache page size in tokens.")
flags.DEFINE_integer("num_pages", CacheConfig.num_pages, "KV cache pages.")
flags.DEFINE_bool("enable_prefix_caching", CacheConfig.enable_prefix_caching,
                  "Reuse the KV pages of prompt prefixes seen before "
                  "(--noenable_prefix_caching turns it off).")
flags.DEFINE_integer("max_model_len", None, "Context limit (default: the model's).")
flags.DEFINE_integer("tensor_parallel", 1, "Devices to split the weights and KV heads "
                     "over (across hosts too, with --num_processes).")
flags.DEFINE_string("coordinator_address", "127.0.0.1:12355", "host:port of process 0, for "
                    "multi-host runs (jax.distributed).")
flags.DEFINE_integer("num_processes", 1, "Processes (hosts) in a multi-host run.")
flags.DEFINE_integer("process_id", 0, "This process's rank in a multi-host run.")
flags.DEFINE_string("attention_impl", "auto", "Attention implementation (auto: cpu_ffi on CPU, "
                    "or xla if it cannot be built; pallas_gpu on GPU, pallas_tpu on TPU; "
                    "reference: the jax.numpy ground truth, on any device).")

FLAGS = flags.FLAGS


def _ladder(name: str, values: list[str] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if values is None:
        return default
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{name} must be a comma-separated list of integers, "
                          f"got {','.join(values)!r}") from None


def engine_config_from_flags() -> EngineConfig:
    """An EngineConfig from the flags above; bad values raise ConfigError naming the flag."""
    default = BucketConfig()
    try:
        buckets = BucketConfig(_ladder("token_buckets", FLAGS.token_buckets,
                                       default.token_buckets),
                               _ladder("seq_buckets", FLAGS.seq_buckets, default.seq_buckets))
        cache = CacheConfig(FLAGS.page_size, FLAGS.num_pages, FLAGS.enable_prefix_caching)
    except ConfigError as e:
        raise ConfigError(f"bad bucket or cache flag: {e}") from None
    return EngineConfig(
        model=FLAGS.model, dtype=FLAGS.dtype, buckets=buckets, cache=cache,
        max_model_len=FLAGS.max_model_len,
        attention_impl=FLAGS.attention_impl, tensor_parallel=FLAGS.tensor_parallel,
        scheduler=SchedulerConfig(policy=FLAGS.scheduler,
                                  max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                                  profile=FLAGS.profile, force_profile=FLAGS.force_profile,
                                  auto_profile=FLAGS.auto_profile))


def initialize_distributed_from_flags() -> None:
    """Join a multi-host run if ``--num_processes`` > 1 (before building an engine)."""
    from fbjax.engine import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
