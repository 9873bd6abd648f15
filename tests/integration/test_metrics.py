"""Prometheus metrics reach Ray's metrics endpoint; the response cache answers repeats (and counts them)."""
from __future__ import annotations

import re
import time

import httpx


def scrape(metrics_url: str, pattern: str, timeout: float = 40.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = [ln for ln in httpx.get(metrics_url, timeout=10).text.splitlines() if re.search(pattern, ln)]
            if lines:
                return lines
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return []


def test_request_latency_engine_and_cache_metrics_are_exported(client, metrics_url):
    kwargs = dict(model="base", messages=[{"role": "user", "content": "metrics please"}], max_tokens=6,
                  temperature=0)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)  # deterministic repeat: served from the cache
    assert second.choices[0].message.content == first.choices[0].message.content and second.id != first.id
    assert scrape(metrics_url, r'^ray_llmaas_requests_total\{.*route="/v1/chat/completions".*status="200"')
    assert scrape(metrics_url, r'^ray_llmaas_ttft_seconds_bucket\{')
    assert scrape(metrics_url, r'^ray_llmaas_e2e_latency_seconds_count\{')
    assert scrape(metrics_url, r'^ray_llmaas_completion_tokens_total\{')
    assert scrape(metrics_url, r'^ray_llmaas_kv_cache_usage\{')
    assert scrape(metrics_url, r'^ray_llmaas_running_sequences\{')
    assert scrape(metrics_url, r'^ray_llmaas_response_cache_total\{.*result="hit"')
