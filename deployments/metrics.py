"""Prometheus metrics through Ray's metrics API (scraped from each node's metrics export port)."""
from __future__ import annotations

from ray.util import metrics

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2]


ANONYMOUS_TENANT = "anonymous"  # the tenant label of requests without a key (auth off, handle callers)


def tenant_label(tenant: str | None) -> str:
    return ANONYMOUS_TENANT if tenant is None else tenant


class RouterMetrics:
    """Requests by route/status/tenant, TTFT / TPOT / end-to-end latency by model, tokens by model and tenant
    (what the usage ledger meters), cache hits."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("llmaas_requests_total", "HTTP requests by route, status and tenant",
                                        tag_keys=("route", "status", "tenant"))
        self.ttft = metrics.Histogram("llmaas_ttft_seconds", "Time to first token", boundaries=LATENCY_BUCKETS,
                                      tag_keys=("model",))
        self.tpot = metrics.Histogram("llmaas_tpot_seconds", "Time per output token after the first",
                                      boundaries=TOKEN_BUCKETS, tag_keys=("model",))
        self.e2e = metrics.Histogram("llmaas_e2e_latency_seconds", "Completion latency per choice",
                                     boundaries=LATENCY_BUCKETS, tag_keys=("model",))
        usage_tags = ("model", "tenant")
        self.tokens_in = metrics.Counter("llmaas_prompt_tokens_total", "Prompt tokens billed", tag_keys=usage_tags)
        self.tokens_out = metrics.Counter("llmaas_completion_tokens_total", "Completion tokens billed",
                                          tag_keys=usage_tags)
        self.tokens_cached = metrics.Counter("llmaas_cached_tokens_total", "Prompt tokens the prefix cache served",
                                             tag_keys=usage_tags)
        self.metered = metrics.Counter("llmaas_metered_requests_total", "Requests answered (metered)",
                                       tag_keys=usage_tags)
        self.cache = metrics.Counter("llmaas_response_cache_total", "Response cache lookups",
                                     tag_keys=("result",))

    def on_request(self, route: str, status: int, tenant: str | None = None) -> None:
        self.requests.inc(1, {"route": route, "status": str(status), "tenant": tenant_label(tenant)})

    def on_choice(self, model: str, ttft_s: float | None, e2e_s: float, completion_tokens: int) -> None:
        tags = {"model": model}
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags)
            if completion_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (completion_tokens - 1), tags)
        self.e2e.observe(e2e_s, tags)

    def on_usage(self, tenant: str | None, model: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int) -> None:
        """One answered request's usage, as the ledger records it (n choices of a prompt count it once)."""
        tags = {"model": model, "tenant": tenant_label(tenant)}
        self.metered.inc(1, tags)
        for counter, n in ((self.tokens_in, prompt_tokens), (self.tokens_out, completion_tokens),
                           (self.tokens_cached, cached_tokens)):
            if n:
                counter.inc(n, tags)

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
