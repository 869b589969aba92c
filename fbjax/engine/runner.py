"""ModelRunner: the KV page pool on device and one compiled step per bucket.

A step is ``(params, kv_cache, penalty_state, batch) -> (sampled tokens, logprobs,
kv_cache, penalty_state)``: the decoder over the ragged batch, logits only at each
sequence's last token, penalties, sampling (and the log-probabilities rows asked for) on
device. The cache and the penalty state (engine/penalties.py) are donated, so XLA
updates them in place.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from fbjax_kernels.ragged_paged_attention import cpu_ffi, get_attention, resolve_impl

from fbjax.config import BucketConfig, CacheConfig, ModelConfig
from fbjax.engine.batch import RaggedBatch, batch_shapes
from fbjax.engine.buckets import CompiledBuckets
from fbjax.engine.penalties import (
    PenaltyState,
    count_sampled,
    init_slot,
    init_slot_args,
    make_penalty_state,
    penalize,
)
from fbjax.engine.sampling import (
    apply_logit_bias,
    prompt_token_logprobs,
    sample_tokens,
    token_logprobs,
)
from fbjax.engine.sharding import kv_pool_sharding, make_mesh, param_shardings, replicated
from fbjax.engine.step_export import StepExporter
from fbjax.model.llama import KVCache, LlamaForCausalLM

log = logging.getLogger(__name__)


def make_kv_pool(model: ModelConfig, cache: CacheConfig, dtype) -> KVCache:
    """Zeroed page pool: per layer (k, v) of [num_pages, page_size, kv_heads, head_dim]."""
    shape = (cache.num_pages, cache.page_size, model.num_kv_heads, model.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(model.num_layers))


def make_step_fn(model: LlamaForCausalLM):
    def step(params, kv_cache: KVCache, penalty_state: PenaltyState, batch: RaggedBatch):
        hidden, kv_cache = model.apply({"params": params}, batch.tokens, kv_cache,
                                       batch.attention)
        logits = model.apply({"params": params}, hidden[batch.logits_indices],
                             method=LlamaForCausalLM.logits)
        s = batch.sampling
        biased = apply_logit_bias(logits, s.bias_ids, s.bias_values)
        penalized = penalize(biased, penalty_state, s.penalty_slot, s.presence_penalty,
                             s.frequency_penalty, s.repetition_penalty)
        tokens = sample_tokens(penalized, s.temperature, s.top_k, s.top_p, s.seeds,
                               s.output_index, s.min_p)
        penalty_state = count_sampled(penalty_state, s.penalty_slot, tokens)
        # Log-probabilities of the model's own distribution, before bias, penalties and
        # filters.
        prompt = prompt_token_logprobs(
            lambda h: model.apply({"params": params}, h, method=LlamaForCausalLM.logits),
            hidden, batch.prompt_targets, model.config.vocab_size)
        return (tokens, (token_logprobs(logits, tokens, s.num_logprobs), prompt), kv_cache,
                penalty_state)

    return step


class ModelRunner:
    """Holds params and the page pool; runs a batch on its bucket's executable."""

    def __init__(self, model_config: ModelConfig, params, cache: CacheConfig,
                 buckets: BucketConfig, max_model_len: int, attention_impl: str = "auto",
                 dtype=jnp.float32, show_progress: bool = True,
                 tensor_parallel: int = 1, export_dir: str | None = None) -> None:
        self.model_config = model_config
        self.pages_per_seq = -(-max_model_len // cache.page_size)
        self.max_model_len = max_model_len
        self.model = LlamaForCausalLM(model_config, get_attention(attention_impl), dtype)
        self.kv_cache = make_kv_pool(model_config, cache, dtype)
        # One penalty slot per row of the largest bucket (see engine/penalties.py).
        self.num_penalty_slots = buckets.max_seqs
        self.penalty_state = make_penalty_state(self.num_penalty_slots,
                                                model_config.vocab_size)
        # With tensor_parallel > 1 the weights and pages are laid out over a ``tp`` mesh
        # and every bucket compiles for that layout (see engine/sharding.py).
        self.mesh = make_mesh(model_config, tensor_parallel) if tensor_parallel > 1 else None
        if self.mesh is not None:
            params = jax.device_put(params, param_shardings(params, self.mesh))
            self.kv_cache = jax.device_put(self.kv_cache, kv_pool_sharding(self.mesh))
            self.penalty_state = jax.device_put(self.penalty_state, replicated(self.mesh))
        self.params = params
        step = make_step_fn(self.model)
        # Exported steps carry no sharding here, so a tensor-parallel runner traces.
        exporter = None
        if export_dir is not None and self.mesh is None:
            impl = resolve_impl(attention_impl)
            if impl == "cpu_ffi":
                impl = f"cpu_ffi-{cpu_ffi.default_isa()}"
            # What the step closes over that its argument shapes do not show (the
            # matmul precision too: a context such as jax.default_matmul_precision
            # changes the traced program).
            context = (f"{model_config!r}|{impl}|{jnp.dtype(dtype).name}"
                       f"|{jax.default_matmul_precision.value}")
            exporter = StepExporter(export_dir, step, "step", context=context, custom_calls=[
                cpu_ffi.target_name(isa) for isa in cpu_ffi.supported_isas()])
        start = time.perf_counter()
        self.executables = CompiledBuckets.compile(
            step,
            buckets,
            example_args=lambda t, s: (params, self.kv_cache, self.penalty_state,
                                       batch_shapes(t, s, self.pages_per_seq)),
            donate_argnums=(1, 2),
            show_progress=show_progress,
            exporter=exporter,
        )
        # One shape for every request (tokens padded to the context): never recompiles.
        self._init_slot = jax.jit(init_slot, donate_argnums=0).lower(
            self.penalty_state, *init_slot_args(0, [], 0, max_model_len)).compile()
        self.startup_seconds = time.perf_counter() - start
        log.info("compiled %d bucket executables in %.1f s", len(self.executables),
                 self.startup_seconds)

    def run(self, batch: RaggedBatch) -> StepResult:
        """Execute one step: the sampled token of each bucket row (padding included) and,
        left on device until asked for, the log-probabilities."""
        bucket = (batch.tokens.shape[0], batch.logits_indices.shape[0])
        tokens, logprobs, self.kv_cache, self.penalty_state = self.executables.get(bucket)(
            self.params, self.kv_cache, self.penalty_state, batch)
        return StepResult(np.asarray(tokens), logprobs)

    def init_penalty_slot(self, slot: int, token_ids: Sequence[int], prompt_len: int) -> None:
        """Rebuild ``slot``'s counts from a request's tokens (prompt, then outputs so far),
        before the step in which it first samples with that slot."""
        self.penalty_state = self._init_slot(
            self.penalty_state, *init_slot_args(slot, token_ids, prompt_len,
                                                self.max_model_len))


Logprobs = tuple[jax.Array, jax.Array, jax.Array]  # chosen [N], top ids [N, K], top values


@dataclasses.dataclass
class StepResult:
    """One step's output. The log-probabilities (of each row's sampled token, and of
    each token's next prompt token) stay on device: copying them costs only steps that
    use them."""

    tokens: np.ndarray
    logprobs: tuple[Logprobs, Logprobs]

    def host_logprobs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.asarray(a) for a in self.logprobs[0])

    def host_prompt_logprobs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.asarray(a) for a in self.logprobs[1])
