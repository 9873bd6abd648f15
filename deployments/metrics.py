"""Prometheus metrics through Ray's metrics API (scraped from each node's metrics export port)."""
from __future__ import annotations

from ray.util import metrics

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2]


class RouterMetrics:
    """Requests by route/status, TTFT / TPOT / end-to-end latency and tokens by model, cache hits."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("llmaas_requests_total", "HTTP requests by route and status",
                                        tag_keys=("route", "status"))
        self.ttft = metrics.Histogram("llmaas_ttft_seconds", "Time to first token", boundaries=LATENCY_BUCKETS,
                                      tag_keys=("model",))
        self.tpot = metrics.Histogram("llmaas_tpot_seconds", "Time per output token after the first",
                                      boundaries=TOKEN_BUCKETS, tag_keys=("model",))
        self.e2e = metrics.Histogram("llmaas_e2e_latency_seconds", "Completion latency per choice",
                                     boundaries=LATENCY_BUCKETS, tag_keys=("model",))
        self.tokens_in = metrics.Counter("llmaas_prompt_tokens_total", "Prompt tokens", tag_keys=("model",))
        self.tokens_out = metrics.Counter("llmaas_completion_tokens_total", "Generated tokens", tag_keys=("model",))
        self.cache = metrics.Counter("llmaas_response_cache_total", "Response cache lookups",
                                     tag_keys=("result",))

    def on_request(self, route: str, status: int) -> None:
        self.requests.inc(1, {"route": route, "status": str(status)})

    def on_choice(self, model: str, ttft_s: float | None, e2e_s: float, prompt_tokens: int,
                  completion_tokens: int) -> None:
        tags = {"model": model}
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags)
            if completion_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (completion_tokens - 1), tags)
        self.e2e.observe(e2e_s, tags)
        self.tokens_in.inc(prompt_tokens, tags)
        if completion_tokens:
            self.tokens_out.inc(completion_tokens, tags)

    def on_cache(self, hits: int, misses: int) -> None:
        if hits:
            self.cache.inc(hits, {"result": "hit"})
        if misses:
            self.cache.inc(misses, {"result": "miss"})


class EngineMetrics:
    """Running/waiting sequences, KV-cache usage and resident adapters of one model replica."""

    def __init__(self) -> None:
        self.running = metrics.Gauge("llmaas_running_sequences", "Sequences in the running batch")
        self.waiting = metrics.Gauge("llmaas_waiting_sequences", "Sequences queued for admission")
        self.kv_usage = metrics.Gauge("llmaas_kv_cache_usage", "Share of KV-cache blocks in use")
        self.adapters = metrics.Gauge("llmaas_adapters_loaded", "Adapters registered in the engine")
        self.adapter_events = metrics.Counter("llmaas_adapter_events_total", "Adapter loads and evictions",
                                              tag_keys=("event",))

    def update(self, stats: dict[str, float]) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.adapters.set(stats["adapters"])
