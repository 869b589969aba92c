"""LLMEngine: add/abort/step over a scheduler and a model runner; offline ``generate``.

The engine only executes plans: the scheduler decides who runs, the runner computes,
and the engine does the rest of the bookkeeping a user sees (validation with clear
errors, per-request seeds, stop strings, outputs).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp

from fbjax.config import EngineConfig, SchedulerConfig
from fbjax.engine.batch import build_batch
from fbjax.engine.buckets import enable_compilation_cache, steps_dir
from fbjax.engine.penalties import PenaltySlots
from fbjax.engine.runner import ModelRunner
from fbjax.model.weights import LoadedModel, load_model
from fbjax.profiling import measure as measure_module
from fbjax.profiling.device import current_device_key
from fbjax.profiling.store import (
    ProfileNotFound,
    default_profile_path,
    load_engine_profile,
    model_key,
    profile_command,
)
from fbjax.sched.base import StepLimits, StepPlan
from fbjax.sched.kv_cache import KVCacheManager
from fbjax.sched.latency import LatencyModel, StepFeatures
from fbjax.sched.registry import needs_latency_model, scheduler_from_config
from fbjax.sched.request import (
    InvalidRequestError,
    Request,
    RequestStatus,
    SamplingParams,
    TokenLogprob,
    check_slo,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the new tokens, if the request asked


@dataclasses.dataclass
class CompletionOutput:
    """A finished request: its tokens, text and timings."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    arrival_time: float
    token_times: list[float]
    finish_time: float | None
    num_preemptions: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per token, if the request asked
    # One per prompt token after the first, if the request asked (prompt_logprobs).
    prompt_logprobs: list[TokenLogprob] | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None,
                 loaded: LoadedModel | None = None) -> None:
        self.config = config = config or EngineConfig()
        enable_compilation_cache(config.compilation_cache_dir)
        dtype = jnp.dtype(config.dtype)
        self.loaded = loaded or load_model(config.model, dtype)
        self.model_config = mc = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.kv = KVCacheManager(config.cache.num_pages, config.cache.page_size,
                                 config.cache.enable_prefix_caching)
        sched = config.scheduler
        self.device_key = current_device_key()
        self.model_key = model_key(config.model)
        self.runner: ModelRunner | None = None
        self.use_scheduler(sched)  # before compiling: a bad profile fails fast
        self.runner = ModelRunner(mc, self.loaded.params, config.cache, config.buckets,
                                  self.max_model_len, config.attention_impl, dtype,
                                  config.show_progress, config.tensor_parallel,
                                  export_dir=steps_dir(config.compilation_cache_dir))
        if self._profile_pending:  # measured on the compiled buckets
            self.use_scheduler(sched)
        self.penalty_slots = PenaltySlots(self.runner.num_penalty_slots)
        self._ids = itertools.count()
        self._seeds = random.Random(mc.seed)
        self._stop_texts: dict[str, str] = {}  # text cut at a stop string
        self._finished: dict[str, Request] = {}
        self.num_steps = 0
        self.last_plan: StepPlan | None = None  # read-only for observers (server metrics)
        # Step timing: the runner call only (it returns host arrays, so the device work
        # is done). ``step_clock`` is replaceable (tests inject step times through it);
        # ``step_observer(plan, seconds)``, if set, sees every measured step.
        self.step_clock: Callable[[], float] = time.perf_counter
        self.step_observer: Callable[[StepPlan, float], None] | None = None
        self.last_step_seconds = 0.0

    def use_scheduler(self, sched: SchedulerConfig) -> None:
        """Build the scheduler ``sched`` names (on an idle engine: replays compare policies
        without recompiling). The latency profile (FairBatching needs one; any policy may
        refine one) is checked against this device, model and bucket set. The prefix
        cache starts cold, so policies compared on one engine start alike."""
        if getattr(self, "scheduler", None) is not None and self.scheduler.has_unfinished():
            raise RuntimeError("cannot change the scheduler with requests in flight")
        self.kv.reset_prefix_cache()
        config = self.config = dataclasses.replace(self.config, scheduler=sched)
        self.latency: LatencyModel | None = None
        self.profile_path: Path | None = None
        self._profile_pending = False
        if needs_latency_model(sched.policy) or sched.profile:
            warnings: list[str] = []
            try:
                self.latency, self.profile_path, warnings = load_engine_profile(
                    sched.profile, device=self.device_key, model=self.model_key,
                    buckets=config.buckets, force=sched.force_profile,
                    model_spec=config.model)
            except ProfileNotFound:
                if sched.profile is not None or not sched.auto_profile:
                    raise
                if self.runner is None:
                    # Called before compiling: measure once the buckets exist; until
                    # then a placeholder policy that needs no profile.
                    self._profile_pending = True
                    sched = dataclasses.replace(sched, policy="vllm", profile=None)
                else:
                    self.latency, self.profile_path = self._measure_profile()
            for warning in warnings:
                log.warning(warning)
        limits = StepLimits.from_buckets(config.buckets, sched.max_num_batched_tokens,
                                         sched.max_num_seqs)
        self.scheduler = scheduler_from_config(sched, limits, self.kv, self.latency)

    def _measure_profile(self) -> tuple[LatencyModel, Path]:
        """Measure this engine's latency profile (bounded time, with a progress bar),
        save it where the next start finds it, and return it."""
        settings = measure_module.AUTO
        log.warning("no latency profile for %s on %s with these buckets: measuring one "
                    "(at most ~%.0f s; `%s` records a finer one)", self.model_key,
                    self.device_key, settings.time_limit_s,
                    profile_command(self.config.model, self.config.buckets))
        recording = measure_module.record_profile(self, settings, "auto (engine start-up)",
                                                  self.config.show_progress)
        path = default_profile_path(self.device_key, self.model_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        recording.model.save(path)
        h = recording.model.heldout
        log.warning("measured %d step contents in %.0f s; held-out error %s; saved to %s",
                    len(recording.measurements), recording.seconds,
                    f"MAPE {h.mape * 100:.1f}%, p95 {h.p95_abs_ms:.2f} ms" if h else "n/a",
                    path)
        return recording.model, path

    # ----- requests ---------------------------------------------------------------
    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    ttft_slo: float | None = None, tpot_slo: float | None = None) -> str:
        """Validate and enqueue a request; returns its id. Raises InvalidRequestError."""
        sampling = sampling or SamplingParams()
        token_ids = self.encode_and_validate(prompt, sampling, ttft_slo, tpot_slo)
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=self._seeds.getrandbits(32))
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(request_id, token_ids, sampling,
                          time.monotonic() if arrival_time is None else arrival_time,
                          eos_token_ids=self.tokenizer.eos_token_ids,
                          ttft_slo=ttft_slo, tpot_slo=tpot_slo)
        try:
            self.scheduler.add_request(request)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        return request_id

    def encode_prompt(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of prompt text; InvalidRequestError for empty or invalid Unicode
        text (a lone surrogate from JSON's ``\\ud800`` cannot be tokenized)."""
        if not text:
            raise InvalidRequestError(f"{param} is empty: give at least one character", param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"{param} is not valid Unicode text ({e.reason} at "
                                      f"character {e.start})", param) from None
        return self.tokenizer.encode(text)

    def encode_and_validate(self, prompt: str | list[int], sampling: SamplingParams,
                            ttft_slo: float | None = None,
                            tpot_slo: float | None = None) -> list[int]:
        """The prompt's token ids, or InvalidRequestError naming what is wrong. The one
        place every request is checked against the model and the compiled step (the
        server calls it too, before it queues anything)."""
        vocab = self.model_config.vocab_size
        token_ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise InvalidRequestError("prompt is empty: give at least one token", "prompt")
        bad = [t for t in token_ids
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]!r} is outside the vocabulary "
                                      f"[0, {vocab})", "prompt")
        if sampling.top_k > vocab:
            raise InvalidRequestError(f"top_k must be at most the vocabulary size ({vocab}), "
                                      f"got {sampling.top_k}", "top_k")
        bad = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"stop token id {bad[0]} is outside the vocabulary "
                                      f"[0, {vocab})", "stop_token_ids")
        bad = [t for t, _ in sampling.logit_bias if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                                      f"[0, {vocab})", "logit_bias")
        check_slo("ttft_slo", ttft_slo)
        check_slo("tpot_slo", tpot_slo)
        total = len(token_ids) + sampling.max_tokens
        if len(token_ids) >= self.max_model_len or total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt of {len(token_ids)} tokens plus max_tokens={sampling.max_tokens} "
                f"exceeds the model's context of {self.max_model_len} tokens", "max_tokens")
        return token_ids

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request; its KV pages are freed at once. False if unknown or done."""
        request = self.scheduler.abort_request(request_id, time.monotonic())
        if request is None:
            return False
        self._finished[request_id] = request
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the step ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run and record one step; returns the requests that got tokens."""
        plan = self.scheduler.schedule(time.monotonic())
        self.last_plan = plan
        if plan.is_empty:
            return []
        batch = build_batch(plan, self.kv, self.runner.pages_per_seq,
                            self._penalty_slots(plan))
        start = self.step_clock()
        result = self.runner.run(batch)
        sampled_rows = result.tokens
        seconds = self.last_step_seconds = self.step_clock() - start
        now = time.monotonic()
        self._observe_step(plan, seconds)
        sampled = {c.request.request_id: int(sampled_rows[i])
                   for i, c in enumerate(plan.chunks) if c.completes}
        self.scheduler.on_step_done(plan, sampled, now)
        self._record_logprobs(plan, result)
        self._record_prompt_logprobs(plan, batch.attention.cu_q_lens, result)
        self.num_steps += 1
        return self._collect_outputs(plan, sampled)

    def _penalty_slots(self, plan: StepPlan) -> dict[str, int]:
        """The penalty slots of the penalized requests that sample in this step, their
        rows rebuilt on device where a slot is newly lent (engine/penalties.py)."""
        penalized = [c.request for c in plan.chunks
                     if c.completes and c.request.sampling.has_penalties]
        if not penalized:
            return {}
        slots, fresh = self.penalty_slots.assign(penalized)
        for slot, request in fresh:
            self.runner.init_penalty_slot(slot, request.token_ids, request.prompt_len)
        return slots

    @staticmethod
    def _record_prompt_logprobs(plan: StepPlan, cu_q_lens, result) -> None:
        """The log-probabilities of the prompt tokens this step's chunks predicted, for
        the requests that asked; each prompt token once, in order (a chunk recomputed
        after a preemption adds nothing)."""
        rows = [(i, c) for i, c in enumerate(plan.chunks)
                if c.request.sampling.prompt_logprobs is not None
                and c.start + 1 < c.request.prompt_len]
        if not rows:
            return
        chosen, ids, values = result.host_prompt_logprobs()
        for i, chunk in rows:
            request, n = chunk.request, chunk.request.sampling.prompt_logprobs
            offset = int(cu_q_lens[i]) - chunk.start
            done = request.prompt_logprobs
            for position in range(chunk.start, min(chunk.start + chunk.num_tokens,
                                                   request.prompt_len - 1)):
                if position != len(done):  # predicts prompt token len(done) + 1
                    continue
                j = offset + position
                top = tuple(zip(ids[j, :n].tolist(), values[j, :n].tolist(), strict=True))
                done.append(TokenLogprob(request.token_ids[position + 1], float(chosen[j]),
                                         top))

    @staticmethod
    def _record_logprobs(plan: StepPlan, result) -> None:
        """Each sampled token's log-probabilities, for the requests that asked (copied
        from the device only in steps that hold one)."""
        rows = [(i, c.request) for i, c in enumerate(plan.chunks)
                if c.completes and c.request.sampling.logprobs is not None]
        if not rows:
            return
        chosen, ids, values = result.host_logprobs()
        for i, request in rows:
            if len(request.output_logprobs) >= request.num_output_tokens:
                continue  # no token was added (aborted during the step)
            n = request.sampling.logprobs
            top = tuple(zip(ids[i, :n].tolist(), values[i, :n].tolist(), strict=True))
            request.output_logprobs.append(
                TokenLogprob(int(result.tokens[i]), float(chosen[i]), top))

    def _observe_step(self, plan: StepPlan, seconds: float) -> None:
        """Feed a measured step time to the latency model (online refinement)."""
        if self.latency is not None and self.config.scheduler.online_update:
            feats = StepFeatures.of_chunks((c.num_tokens, c.kv_len, c.is_decode)
                                           for c in plan.chunks)
            self.latency.update(plan.bucket, feats, seconds)
        if self.step_observer is not None:
            self.step_observer(plan, seconds)

    def save_profile(self, path: str | Path) -> None:
        """Write the latency model as refined online so far (corrections folded in)."""
        if self.latency is None:
            raise ValueError("this engine has no latency profile to save")
        m = self.latency
        m.metadata["online_refinement"] = {
            "from": str(self.profile_path), "updates": m.num_updates,
            "outliers_rejected": m.num_outliers,
            "corrections": {f"{b[0]}x{b[1]}": round(c, 4) for b, c in
                            sorted(m.correction.items()) if c != 1.0}}
        m.save(path)

    def _collect_outputs(self, plan: StepPlan, sampled: dict[str, int]) -> list[RequestOutput]:
        outputs = []
        for chunk in plan.chunks:
            request = chunk.request
            if request.request_id not in sampled:
                continue
            if request.sampling.stop and not request.finished:
                self._check_stop_strings(request)
            if request.finished:
                self._finished[request.request_id] = request
            logprobs = (request.output_logprobs[-1:]
                        if request.sampling.logprobs is not None else None)
            outputs.append(RequestOutput(request.request_id, [sampled[request.request_id]],
                                         request.finished,
                                         request.status.value if request.finished else None,
                                         logprobs))
        return outputs

    def _check_stop_strings(self, request: Request) -> None:
        text = self.tokenizer.decode(request.output_token_ids)
        hits = [i for i in (text.find(s) for s in request.sampling.stop) if i >= 0]
        if hits:
            self._stop_texts[request.request_id] = text[:min(hits)]
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED,
                                          request.token_times[-1])

    def pop_finished(self, request_id: str) -> CompletionOutput:
        """The finished request's full output (its text decoded once, here)."""
        request = self._finished.pop(request_id)
        text = self._stop_texts.pop(request_id, None)
        if text is None:
            text = self.tokenizer.decode(request.output_token_ids)
        return CompletionOutput(
            request_id, request.token_ids[:request.prompt_len], list(request.output_token_ids),
            text, request.status.value, request.arrival_time, list(request.token_times),
            request.finish_time, request.num_preemptions, request.num_cached_tokens,
            list(request.output_logprobs) if request.sampling.logprobs is not None else None,
            (list(request.prompt_logprobs) if request.sampling.prompt_logprobs is not None
             else None))

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache's contents (requests in flight keep their pages)."""
        self.kv.reset_prefix_cache()

    # ----- offline API ------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[CompletionOutput]:
        """Run prompts to completion (continuous batching); outputs in prompt order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        pairs = list(zip(prompts, params, strict=True))
        for prompt, sp in pairs:  # all or nothing: no request is queued if one is bad
            self.encode_and_validate(prompt, sp or SamplingParams())
        ids = [self.add_request(p, s) for p, s in pairs]
        while self.has_unfinished_requests():
            self.step()
        return [self.pop_finished(i) for i in ids]
