"""Per-tenant rate limits (429 + Retry-After) and the end-to-end request timeout, over real HTTP."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer
from tests.integration.conftest import assert_aborted_and_freed, engine_stats, release_root_actors

KEYS = {"trial": "trial-secret-key-0001", "paid": "paid-secret-key-00002", "fan": "fan-out-secret-key-003",
        "tok": "token-rate-secret-key-4", "quota": "quota-secret-key-00005", "ops": "ops-admin-secret-key-6"}
TOKENS_PER_MINUTE = 200
MSG = [{"role": "user", "content": "hi"}]
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def limits_url(ray_cluster, app_args, tiny_long_chat_dir, tmp_path_factory):
    cfg = AppConfig.model_validate({
        **app_args, "model": {"source": str(tiny_long_chat_dir), "served_name": "tiny-long"},
        "storage_root": str(tmp_path_factory.mktemp("limits-storage")), "response_cache_size": 0,
        "auth": {"api_keys": [{"key": KEYS[t], "tenant": t, "admin": t == "ops"} for t in KEYS]},
        "rate_limits": {"tenants": {"trial": 3, "fan": 6},
                        "tenant_tokens": {"tok": {"tokens_per_minute": TOKENS_PER_MINUTE},
                                          "quota": {"monthly_tokens": 50}}},
        "request_timeout_s": TIMEOUT_S,
        "tokenize_in_router": False})  # this app tokenizes in the Tokenizer deployment (the default app: the Router)
    # two Router replicas: every limit must hold for the cluster, not per replica
    app = Router.options(num_replicas=2).bind(Tokenizer.bind(cfg), LLMServer.options(
        ray_actor_options={"num_cpus": 0.5}).bind(cfg), cfg)
    serve.run(app, name="limits-app", route_prefix="/limits")
    yield f"{ray_cluster}/limits"
    serve.delete("limits-app")
    release_root_actors(cfg.storage_root)


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


def test_token_rate_and_monthly_quota_hold_across_two_router_replicas(limits_url):
    routers = serve.status().applications["limits-app"].deployments["Router"].replica_states
    assert routers.get("RUNNING") == 2
    body = {"model": "tiny-long", "messages": MSG, "max_tokens": 60, "ignore_eos": True}
    with httpx.stream("POST", f"{limits_url}/v1/chat/completions", json={**body, "stream": True},
                      headers=h("tok"), timeout=60) as streamed:  # the budget headers lead a stream too
        events = [ln for ln in streamed.iter_lines() if ln]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]", events[-2:]
    answers = [httpx.post(f"{limits_url}/v1/chat/completions", json=body, headers=h("tok"), timeout=60)
               for _ in range(5)]
    ok = [r for r in answers if r.status_code == 200]
    cost = ok[0].json()["usage"]["total_tokens"]  # all used what they reserved (ignore_eos): nothing comes back
    assert len(ok) + 1 == TOKENS_PER_MINUTE // cost == 2, [r.status_code for r in answers]  # per replica it'd be ~4
    assert streamed.headers["x-ratelimit-limit-tokens"] == ok[0].headers["x-ratelimit-limit-tokens"] == str(
        TOKENS_PER_MINUTE)
    assert int(streamed.headers["x-ratelimit-remaining-tokens"]) == TOKENS_PER_MINUTE - cost
    assert TOKENS_PER_MINUTE - 2 * cost <= int(ok[0].headers["x-ratelimit-remaining-tokens"]) < (
        TOKENS_PER_MINUTE - cost)  # what the stream left, and a refill of a few tokens a second since
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.json()["error"]["type"] == "tokens" and int(r.headers["retry-after"]) >= 1
                           and r.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE) for r in refused)

    c = openai.OpenAI(base_url=f"{limits_url}/v1", api_key=KEYS["quota"], max_retries=0, timeout=30)
    c.chat.completions.create(model="tiny-long", messages=MSG, max_tokens=30, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as err:  # 50 a month: the first request spent it
        c.chat.completions.create(model="tiny-long", messages=MSG, max_tokens=1)
    assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"


def test_keys_made_and_revoked_at_runtime_reach_every_router_and_the_audit_log_says_who(limits_url, capsys,
                                                                                        monkeypatch):
    from llmaas.deployments.cli import main as cli

    monkeypatch.setenv("LLMAAS_URL", limits_url)
    monkeypatch.setenv("LLMAAS_API_KEY", KEYS["paid"])
    assert cli(["keys", "create", "--tenant", "dave"]) == 1  # not an admin
    assert "403" in capsys.readouterr().err
    # the README's lines as written (the admin key from the environment; the id the create printed)
    create, listing, revoke, curl = readme_keys_lines()
    monkeypatch.setenv("LLMAAS_API_KEY", KEYS["ops"])
    assert cli(shlex.split(create, comments=True)[1:]) == 0
    out = capsys.readouterr().out.splitlines()
    key_id, secret = out[0].split()[0], out[1]
    dave = {"Authorization": f"Bearer {secret}"}
    assert all(httpx.get(f"{limits_url}/v1/models", headers=dave, timeout=30).status_code == 200 for _ in range(8))
    listed = httpx.get(f"{limits_url}/v1/keys", headers=h("ops"), timeout=30)
    assert secret not in listed.text and secret[-4:] in listed.text  # never the secret, its last four to tell apart
    assert cli(shlex.split(listing, comments=True)[1:]) == 0
    assert f"{key_id}  acme  ...{secret[-4:]}  active  acme ci" in capsys.readouterr().out

    assert cli(shlex.split(revoke.replace("key-0123456789abcdef", key_id), comments=True)[1:]) == 0
    revoked = time.monotonic()
    answers = []
    while time.monotonic() - revoked < 3.0:
        answers.append((time.monotonic() - revoked, httpx.get(f"{limits_url}/v1/models", headers=dave,
                                                              timeout=30).status_code))
    late = [code for t, code in answers if t > 1.0]  # refused within a second on both Routers
    assert len(late) >= 8 and set(late) == {401}, answers

    def audit(action: str) -> list[tuple]:
        events = httpx.get(f"{limits_url}/v1/audit", headers=h("ops"), params={"action": action}, timeout=30)
        return [(e["action"], e["actor"], e["target"], e["outcome"]) for e in events.json()["data"]]

    url = shlex.split(curl)[2].replace("http://127.0.0.1:8000", limits_url)
    by_curl = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['ops']}"}, timeout=30).json()["data"]
    assert [(e["action"], e["target"]) for e in by_curl[:2]] == [("key.revoke", key_id), ("key.create", key_id)]
    assert audit("key.")[:2] == [("key.revoke", "ops", key_id, "ok"), ("key.create", "ops", key_id, "ok")]
    refusals = audit("auth.refused")
    assert ("auth.refused", None, "/v1/models", "invalid_api_key") in refusals  # dave's revoked key, refused
    assert ("auth.refused", "paid", "key.create", "admin_required") in refusals
    assert httpx.get(f"{limits_url}/v1/audit", headers=h("paid"), timeout=30).status_code == 403


def readme_keys_lines() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("**Keys at runtime and the audit log.**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()[1:]  # after the export
    assert [ln.split()[:3] for ln in lines[:3]] == [["llmaas", "keys", "create"], ["llmaas", "keys", "list"],
                                                   ["llmaas", "keys", "revoke"]] and lines[3].startswith("curl ")
    return lines
