"""A request's life: sampling parameters, SLOs, state, and per-token timestamps.

Pure Python, shared by the engine and the simulator. A request's tokens are
``prompt + outputs``; ``num_computed_tokens`` counts those whose K/V are in the cache.
The next step must compute ``num_tokens - num_computed_tokens`` more; when it reaches
the end, a new token is sampled. Prefill, chunked prefill, decode and recompute after
preemption are the same rule (as in vLLM v1), so schedulers never special-case them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Hashable, Sequence


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


# Bounds every request field must respect, so that a step compiled for int32/float32
# rows can hold it and the scheduler's arithmetic stays finite. Checked here, once, for
# LLMEngine and the server alike (the server maps the error to a 400 naming ``param``).
MIN_SLO_S = 1e-3  # a deadline shorter than any step is no deadline (and 0 divides)
MAX_SLO_S = 7 * 24 * 3600.0
SEED_RANGE = 2**32
# The most alternatives per token a request may ask for (OpenAI's and vLLM's limit): the
# compiled step always computes this many.
MAX_LOGPROBS = 20
# The most logit_bias entries per request (OpenAI's limit); the compiled step always
# takes this many, unused ones adding 0.
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0  # |bias| <= this, as OpenAI
PENALTY_RANGE = 2.0  # |presence_penalty|, |frequency_penalty| <= this, as OpenAI
MAX_REPETITION_PENALTY = 2.0  # repetition_penalty in (0, this], as vLLM


class InvalidRequestError(ValueError):
    """The request cannot be served as given; the message says which field and why, and
    ``param`` names the field (OpenAI's error ``param``) where one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_slo(param: str, value: float | None, unit_s: float = 1.0) -> None:
    """A per-request SLO of ``value`` units of ``unit_s`` seconds (1e-3: milliseconds)
    is a finite number between 1 ms and 7 days."""
    if value is None:
        return
    unit = "ms" if unit_s == 1e-3 else "s"
    lo, hi = MIN_SLO_S / unit_s, MAX_SLO_S / unit_s
    if not _is_real(value) or not lo <= value <= hi:
        raise InvalidRequestError(f"{param} must be a number between {lo:g} and {hi:g} "
                                  f"{unit} (1 ms to 7 days), got {value!r}", param)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``temperature == 0`` is greedy, ``top_k <= 0`` disables top-k.

    Values are checked at construction (types strictly: ``True`` is not a token count);
    what depends on the model (``top_k`` and ``stop_token_ids`` against the vocabulary)
    is checked by ``LLMEngine.encode_and_validate``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Log-probability of each sampled token and of this many most likely alternatives
    # (0 to MAX_LOGPROBS); None: none.
    logprobs: int | None = None
    # The same for every prompt token after the first (OpenAI's ``echo`` with
    # ``logprobs``); None: none.
    prompt_logprobs: int | None = None
    # Tokens whose probability is below min_p x the most likely token's are dropped
    # before sampling (0: off).
    min_p: float = 0.0
    # (token id, bias) pairs added to the logits before sampling, greedy included.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # OpenAI's penalties on the tokens generated so far: ``presence`` once per token
    # that occurred, ``frequency`` per occurrence, subtracted from its logit (0: off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' and vLLM's, over the prompt's and the generated tokens: a positive
    # logit is divided by it, another multiplied (1: off; > 1 discourages repeats).
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        object.__setattr__(self, "logit_bias", tuple(tuple(e) for e in self.logit_bias))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}",
                "temperature")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k):
            raise InvalidRequestError(f"top_k must be an integer, got {self.top_k!r}", "top_k")
        if self.seed is not None and (not _is_int(self.seed)
                                      or not 0 <= self.seed < SEED_RANGE):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**32), got "
                                      f"{self.seed!r}", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")
        if any(not _is_int(t) for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be integers", "stop_token_ids")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a boolean, got "
                                      f"{self.ignore_eos!r}", "ignore_eos")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, "
                                      f"got {self.logprobs!r}", "logprobs")
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs)
                or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"prompt_logprobs must be an integer from 0 to "
                                      f"{MAX_LOGPROBS}, got {self.prompt_logprobs!r}",
                                      "prompt_logprobs")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, "
                                      f"got {len(self.logit_bias)}", "logit_bias")
        for entry in self.logit_bias:
            if (len(entry) != 2 or not _is_int(entry[0]) or not _is_real(entry[1])
                    or abs(entry[1]) > LOGIT_BIAS_RANGE):
                raise InvalidRequestError(
                    f"logit_bias maps token ids to numbers in [-{LOGIT_BIAS_RANGE:g}, "
                    f"{LOGIT_BIAS_RANGE:g}], got {entry!r}", "logit_bias")
        self._check_penalties()

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or abs(value) > PENALTY_RANGE:
                raise InvalidRequestError(f"{name} must be a number in [-{PENALTY_RANGE:g}, "
                                          f"{PENALTY_RANGE:g}], got {value!r}", name)
        value = self.repetition_penalty
        if not _is_real(value) or not 0.0 < value <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(f"repetition_penalty must be a number in (0, "
                                      f"{MAX_REPETITION_PENALTY:g}] (1 is off), got "
                                      f"{value!r}", "repetition_penalty")

    @property
    def has_penalties(self) -> bool:
        """Whether sampling depends on the tokens seen so far (the engine then keeps
        their counts on device for this request)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model and the ``logprobs`` most
    likely tokens with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Request:
    """One generation request as the scheduler sees it.

    ``prompt_token_ids`` may be empty in the simulator, where only lengths matter;
    ``prompt_len`` is then given explicitly.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        arrival_time: float,
        *,
        prompt_len: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        ttft_slo: float | None = None,
        tpot_slo: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_len = len(prompt_token_ids) if prompt_len is None else prompt_len
        if self.prompt_len <= 0:
            raise ValueError("prompt is empty: a request needs at least one prompt token")
        self.token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.arrival_time = arrival_time
        self.eos_token_ids = () if sampling.ignore_eos else tuple(eos_token_ids)
        self.ttft_slo = ttft_slo
        self.tpot_slo = tpot_slo
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.token_times: list[float] = []
        self.first_scheduled_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        # Prefix caching: keys of the request's full KV pages (set by the scheduler from
        # the tokens, or by the simulator from a trace's block hashes), and how many
        # prompt tokens the cache supplied when the request was first admitted.
        self.page_keys: Sequence[Hashable] | None = None
        self.num_cached_tokens = 0
        # One per output token when ``sampling.logprobs`` is set, one per prompt token
        # after the first when ``sampling.prompt_logprobs`` is (the engine fills them).
        self.output_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_remaining > 1 or self.num_output_tokens == 0

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_output(self, token: int, now: float) -> None:
        self.output_token_ids.append(token)
        if self.token_ids:  # empty in the simulator, which tracks lengths only
            self.token_ids.append(token)
        self.token_times.append(now)

    def add_output(self, token: int, now: float) -> RequestStatus | None:
        """``append_output`` then ``stop_reason``, in one call (the per-token path)."""
        outputs = self.output_token_ids
        outputs.append(token)
        if self.token_ids:
            self.token_ids.append(token)
        self.token_times.append(now)
        sampling = self.sampling
        if token in self.eos_token_ids or token in sampling.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(outputs) >= sampling.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stop_reason(self) -> RequestStatus | None:
        """Status to finish with after the latest token, judged on token ids only
        (``add_output`` applies the same rule)."""
        outputs, sampling = self.output_token_ids, self.sampling
        last = outputs[-1]
        if last in self.eos_token_ids or last in sampling.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(outputs) >= sampling.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={self.prompt_len}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
