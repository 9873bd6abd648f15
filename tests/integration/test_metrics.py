"""Prometheus metrics reach Ray's metrics endpoint (the response cache's counters: test_response_cache)."""
from __future__ import annotations

import re
import time

import httpx

from tests.integration.conftest import wait_until


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


def metric_total(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none is exported yet)."""
    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        m = re.match(rf"^{name}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_request_latency_engine_and_token_metrics_count_what_happened(base_url, client, metrics_url, tiny_chat_dir,
                                                                       tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.models import make_peft_adapter

    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "m", seed=5)
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": "metered", "path": adapter, "promote": True}, timeout=60)
    assert r.status_code == 200, r.text  # a model label no other test uses: the counts below are this test's
    for max_tokens in (6, 4):
        client.chat.completions.create(model="metered", messages=[{"role": "user", "content": "metrics please"}],
                                       max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    expected = {"ray_llmaas_completion_tokens_total": 10, "ray_llmaas_e2e_latency_seconds_count": 2,
                "ray_llmaas_ttft_seconds_count": 2, "ray_llmaas_tpot_seconds_count": 2}

    def exported() -> dict[str, float]:
        return {name: metric_total(metrics_url, name, model="metered@1") for name in expected}

    assert wait_until(lambda: exported() == expected, 60, every=1.0), exported()
    assert scrape(metrics_url, r'^ray_llmaas_requests_total\{.*route="/v1/chat/completions".*status="200"')
    assert scrape(metrics_url, r'^ray_llmaas_kv_cache_usage\{')
    assert scrape(metrics_url, r'^ray_llmaas_running_sequences\{')
