"""Prometheus metrics of the server, in one registry per server.

Latencies follow fbjax.metrics (vLLM's definitions): TTFT, TPOT (excluding the first
token), ITL (every gap between tokens) and E2EL, observed when a request finishes
from its per-token timestamps, measured from the request's arrival at the server.

Step metrics are recorded by the engine thread after every step: step time by
bucket, step time split between prefill and decode by token share (the
``fbjax_step_time_seconds_total{phase}`` counters; their ratio is the prefill vs
decode share), preemptions, running/waiting requests and KV pages.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from fbjax.engine.engine import CompletionOutput
from fbjax.metrics import RequestMetrics
from fbjax.sched.base import StepPlan

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                   0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                1.28, 2.56)


class ServerMetrics:
    def __init__(self, scheduler: str, model: str, num_pages: int) -> None:
        self.registry = r = CollectorRegistry()
        self.info = Info("fbjax_server", "Scheduler policy and model served", registry=r)
        self.info.info({"scheduler": scheduler, "model": model})
        self.ttft = Histogram("fbjax_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("fbjax_time_per_output_token_seconds",
                              "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fbjax_inter_token_latency_seconds", "Gap between tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2el = Histogram("fbjax_e2e_request_latency_seconds", "Arrival to last token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("fbjax_requests", "Requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("fbjax_requests_rejected", "Requests refused, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("fbjax_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter("fbjax_generation_tokens", "Tokens generated",
                                         registry=r)
        self.running = Gauge("fbjax_num_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("fbjax_num_requests_waiting", "Requests waiting", registry=r)
        self.kv_usage = Gauge("fbjax_kv_cache_usage_ratio", "Share of KV pages in use",
                              registry=r)
        self.kv_free = Gauge("fbjax_kv_cache_free_pages", "Free KV pages", registry=r)
        self.kv_total = Gauge("fbjax_kv_cache_total_pages", "KV pages in the pool", registry=r)
        self.num_pages = num_pages
        self.kv_total.set(num_pages)
        self.kv_free.set(num_pages)
        self.preemptions = Counter("fbjax_preemptions", "Requests preempted", registry=r)
        self.prefix_queries = Counter("fbjax_prefix_cache_queries", "Tokens admitted "
                                      "requests had to compute (looked up in the prefix "
                                      "cache)", registry=r)
        self.prefix_hits = Counter("fbjax_prefix_cache_hits", "Of those, tokens found in "
                                   "the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge("fbjax_prefix_cache_hit_rate", "prefix_cache_hits / "
                                     "prefix_cache_queries since start", registry=r)
        self._prefix_seen = (0, 0)
        self.step_time = Histogram("fbjax_step_duration_seconds", "Engine step time by bucket",
                                   ["bucket"], buckets=STEP_BUCKETS, registry=r)
        self.phase_time = Counter("fbjax_step_time_seconds", "Step time split between prefill "
                                  "and decode tokens by token share", ["phase"], registry=r)
        self.phase_tokens = Counter("fbjax_step_tokens", "Tokens computed, by phase",
                                    ["phase"], registry=r)
        for phase in ("prefill", "decode"):
            self.phase_time.labels(phase)
            self.phase_tokens.labels(phase)
        self._preemptions_seen = 0

    # Called by the engine thread -------------------------------------------------------
    def observe_step(self, plan: StepPlan, duration: float, num_preemptions: int) -> None:
        if num_preemptions > self._preemptions_seen:
            self.preemptions.inc(num_preemptions - self._preemptions_seen)
            self._preemptions_seen = num_preemptions
        if plan.is_empty:
            return
        tokens, seqs = plan.bucket
        self.step_time.labels(f"{tokens}x{seqs}").observe(duration)
        decode = sum(c.num_tokens for c in plan.chunks if c.is_decode)
        prefill = plan.num_tokens - decode
        if prefill + decode:
            self.phase_time.labels("prefill").inc(duration * prefill / (prefill + decode))
            self.phase_time.labels("decode").inc(duration * decode / (prefill + decode))
        self.phase_tokens.labels("prefill").inc(prefill)
        self.phase_tokens.labels("decode").inc(decode)

    def observe_state(self, running: int, waiting: int, free_pages: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_free.set(free_pages)
        self.kv_usage.set(1.0 - free_pages / self.num_pages)

    def observe_prefix_cache(self, queries: int, hits: int) -> None:
        """The scheduler's running totals (token counts) -> counters and the hit rate."""
        seen_queries, seen_hits = self._prefix_seen
        if queries > seen_queries:
            self.prefix_queries.inc(queries - seen_queries)
        if hits > seen_hits:
            self.prefix_hits.inc(hits - seen_hits)
        self._prefix_seen = (max(queries, seen_queries), max(hits, seen_hits))
        if queries:
            self.prefix_hit_rate.set(hits / queries)

    def observe_finished(self, out: CompletionOutput) -> None:
        self.requests.labels(out.finish_reason).inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        if not out.token_times:
            return
        rec = RequestMetrics.from_times(out.arrival_time, out.token_times,
                                        len(out.prompt_token_ids))
        self.ttft.observe(rec.ttft)
        self.e2el.observe(rec.e2el)
        if rec.tpot is not None:
            self.tpot.observe(rec.tpot)
        for gap in rec.itls:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
