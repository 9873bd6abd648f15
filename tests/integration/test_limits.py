"""Per-tenant rate limits (429 + Retry-After) and the end-to-end request timeout, over real HTTP."""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from ray import serve

from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer
from tests.integration.conftest import assert_aborted_and_freed, engine_stats

KEYS = {"trial": "trial-secret-key-0001", "paid": "paid-secret-key-00002", "fan": "fan-out-secret-key-003"}
MSG = [{"role": "user", "content": "hi"}]
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def limits_url(ray_cluster, app_args, tiny_long_chat_dir, tmp_path_factory):
    cfg = AppConfig.model_validate({
        **app_args, "model": {"source": str(tiny_long_chat_dir), "served_name": "tiny-long"},
        "storage_root": str(tmp_path_factory.mktemp("limits-storage")), "response_cache_size": 0,
        "auth": {"api_keys": [{"key": KEYS[t], "tenant": t} for t in KEYS]},
        "rate_limits": {"tenants": {"trial": 3, "fan": 6}}, "request_timeout_s": TIMEOUT_S,
        "tokenize_in_router": False})  # this app tokenizes in the Tokenizer deployment (the default app: the Router)
    app = Router.bind(Tokenizer.bind(cfg), LLMServer.options(ray_actor_options={"num_cpus": 0.5}).bind(cfg), cfg)
    serve.run(app, name="limits-app", route_prefix="/limits")
    yield f"{ray_cluster}/limits"
    serve.delete("limits-app")


def h(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def test_a_tenant_over_its_rate_gets_429_with_retry_after_and_others_do_not(limits_url):
    body = {"model": "tiny-long", "messages": MSG, "max_tokens": 1}
    ok = [httpx.post(f"{limits_url}/v1/chat/completions", json=body, headers=h("trial"), timeout=60)
          for _ in range(3)]
    assert [r.status_code for r in ok] == [200] * 3, ok[-1].text
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
    t = time.monotonic()
    r = httpx.post(f"{limits_url}/v1/chat/completions", json=body, headers=h("trial"), timeout=60)
    assert r.status_code == 429 and time.monotonic() - t < 2.0
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and set(r.json()["error"]) == {
        "message", "type", "param", "code"}
    assert 1 <= int(r.headers["retry-after"]) <= 20  # 3/min: one request back every 20 s
    assert r.headers["x-ratelimit-limit-requests"] == "3" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert 40 <= float(r.headers["x-ratelimit-reset-requests"].rstrip("s")) <= 60  # ~3 requests' worth to refill
    # another tenant is unaffected, and the openai client sees its own RateLimitError type
    assert httpx.post(f"{limits_url}/v1/chat/completions", json=body, headers=h("paid"), timeout=60).status_code == 200
    c = openai.OpenAI(base_url=f"{limits_url}/v1", api_key=KEYS["trial"], max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError):
        c.models.list()


def test_the_rate_limit_counts_choices_not_requests(limits_url):
    """fan has 6 per minute: one request of n=4 spends 4, so a second one of n=4 is over; n=1 still fits."""
    def ask(n: int) -> httpx.Response:
        return httpx.post(f"{limits_url}/v1/chat/completions", headers=h("fan"), timeout=60,
                          json={"model": "tiny-long", "messages": MSG, "max_tokens": 1, "n": n})

    first = ask(4)
    assert first.status_code == 200 and len(first.json()["choices"]) == 4
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    over = ask(4)
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded", over.text
    assert "needs 3" in over.json()["error"]["message"]  # the gate took 1 of the 2 left; 3 more do not fit
    assert ask(1).status_code == 200


def test_request_past_the_timeout_gets_408_and_frees_the_engine(limits_url):
    body = {"model": "tiny-long", "messages": MSG, "max_tokens": 1900, "ignore_eos": True, "n": 4}
    before = engine_stats("limits-app")
    t = time.monotonic()
    r = httpx.post(f"{limits_url}/v1/chat/completions", json=body, headers=h("paid"), timeout=60)
    took = time.monotonic() - t
    assert r.status_code == 408, r.text[:300]
    assert r.json()["error"]["code"] == "request_timeout" and TIMEOUT_S <= took < TIMEOUT_S + 3
    assert_aborted_and_freed("limits-app", before, aborted=4, within=2.0)  # 4 x 1900 tokens: ~20x the window


def test_stream_past_the_timeout_ends_with_an_in_band_error(limits_url):
    body = {"model": "tiny-long", "messages": MSG, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    before = engine_stats("limits-app")
    with httpx.stream("POST", f"{limits_url}/v1/chat/completions", json=body, headers=h("paid"), timeout=60) as r:
        assert r.status_code == 200  # headers went out before the deadline
        lines = [ln for ln in r.iter_lines() if ln]
    tokens = sum('"content":"' in ln for ln in lines)
    assert 0 < tokens < 1900 and '"request_timeout"' in lines[-2] and lines[-1] == "data: [DONE]", lines[-2:]
    assert_aborted_and_freed("limits-app", before, aborted=1, within=2.0)


def test_the_tokenizer_deployment_answers_when_the_router_does_not_tokenize(limits_url):
    """tokenize_in_router: false routes prompts through the Tokenizer stage; its 400s keep their shape."""
    ok = httpx.post(f"{limits_url}/v1/chat/completions", headers=h("paid"), timeout=60,
                    json={"model": "tiny-long", "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0
    r = httpx.post(f"{limits_url}/v1/chat/completions", headers=h("paid"), timeout=60,
                   json={"model": "tiny-long", "messages": MSG, "max_tokens": 10**6})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "messages"
