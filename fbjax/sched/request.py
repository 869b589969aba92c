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


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``temperature == 0`` is greedy, ``top_k <= 0`` disables top-k."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


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
