"""Auth and tenants, input limits, hostile input, client disconnects, backpressure."""
from __future__ import annotations

import concurrent.futures as cf
import json
import shlex
import threading
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from llmaas.deployments.builder import build_app
from tests.integration.conftest import engine_stats, release_root_actors, wait_until
from tests.integration.test_metrics import metric_total

KEYS = {"alice": "alice-secret-key-0001", "bob": "bobs-secret-key-00002", "admin": "admin-secret-key-0003",
        "carol": "carol-secret-key-00004"}  # carol: the usage test's alone (its counts are hers only)
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def auth_storage(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("auth-storage"))


@pytest.fixture(scope="module")
def auth_url(ray_cluster, app_args, auth_storage):
    args = {**app_args, "storage_root": auth_storage,
            "auth": {"api_keys": [{"key": KEYS["alice"], "tenant": "alice"}, {"key": KEYS["bob"], "tenant": "bob"},
                                  {"key": KEYS["carol"], "tenant": "carol"},
                                  {"key": KEYS["admin"], "tenant": "ops", "admin": True}]}}
    serve.run(build_app(args), name="auth-app", route_prefix="/auth")
    yield f"{ray_cluster}/auth"
    serve.delete("auth-app")
    release_root_actors(auth_storage)


def h(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def test_the_router_middleware_is_plain_asgi():
    """A streamed token passes the gate and the body cap as one ``send`` call: no Starlette BaseHTTPMiddleware
    (``@app.middleware("http")``), which relays every chunk through a memory stream read by another task."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from llmaas.deployments.router import api

    names = [m.cls.__name__ for m in api.user_middleware]
    assert names == ["_GateMiddleware", "_BodyCap"]  # outermost first: the gate answers before a body is read
    assert not any(issubclass(m.cls, BaseHTTPMiddleware) for m in api.user_middleware)


def test_every_route_but_health_needs_a_key(auth_url):
    spec = httpx.get(f"{auth_url}/openapi.json", headers=h("admin"), timeout=30).json()  # every FastAPI route
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops] + [("GET", "/openapi.json"),
                                                                                 ("GET", "/docs")]
    assert len(routes) >= 20
    for method, template in routes:
        path = template.replace("{file_id}", "file-x").replace("{job_id}", "ftjob-x") \
            .replace("{name}", "x").replace("{model}", "x@1")
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": "Basic abc"}):
            r = httpx.request(method, f"{auth_url}{path}", headers=headers, timeout=30)
            if template == "/health":
                assert r.status_code == 200
            else:
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"


def test_tenants_see_only_their_own(auth_url, tiny_chat_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.models import make_peft_adapter

    rows = b'{"prompt": "a", "completion": "b"}\n'
    f = httpx.post(f"{auth_url}/v1/files", headers=h("alice"), files={"file": ("t.jsonl", rows)},
                   data={"purpose": "fine-tune"}, timeout=30).json()
    assert httpx.get(f"{auth_url}/v1/files/{f['id']}", headers=h("alice"), timeout=30).status_code == 200
    assert httpx.get(f"{auth_url}/v1/files/{f['id']}", headers=h("bob"), timeout=30).status_code == 404
    assert f["id"] not in str(httpx.get(f"{auth_url}/v1/files", headers=h("bob"), timeout=30).json())
    r = httpx.post(f"{auth_url}/v1/fine_tuning/jobs", headers=h("bob"), timeout=30,
                   json={"model": "base", "training_file": f["id"]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "file_id"

    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "a", seed=3)
    body = {"name": "alices", "path": adapter, "promote": True, "owner": "alice"}
    assert httpx.post(f"{auth_url}/v1/adapters", headers=h("alice"), json=body, timeout=30).status_code == 403
    assert httpx.post(f"{auth_url}/v1/adapters", headers=h("admin"), json=body, timeout=60).status_code == 200
    chat = {"model": "alices", "messages": MSG, "max_tokens": 2}
    assert httpx.post(f"{auth_url}/v1/chat/completions", headers=h("alice"), json=chat, timeout=60).status_code == 200
    r = httpx.post(f"{auth_url}/v1/chat/completions", headers=h("bob"), json=chat, timeout=60)
    assert r.status_code == 404 and "alices" not in r.json()["error"]["message"].split("available:")[1]
    r = httpx.post(f"{auth_url}/v1/chat/completions", headers=h("bob"), json={**chat, "model": "alices@1"},
                   timeout=60)
    assert r.status_code == 404
    bob_models = {m["id"] for m in httpx.get(f"{auth_url}/v1/models", headers=h("bob"), timeout=30).json()["data"]}
    assert "alices" not in bob_models and "base" in bob_models
    alice_models = {m["id"] for m in httpx.get(f"{auth_url}/v1/models", headers=h("alice"), timeout=30).json()["data"]}
    assert {"alices", "alices@1"} <= alice_models


def test_every_tenant_owned_route_refuses_another_tenant(auth_url, tiny_chat_dir, tmp_path):
    """Alice's file, job and adapter, tried by bob on every route that names one (read from /openapi.json, so a
    new route is tried too): never a 2xx, and afterwards all of alice's objects are as they were."""
    from transformers import AutoModelForCausalLM

    from tests.models import make_peft_adapter

    rows = b'{"prompt": "a", "completion": "b"}\n' * 16
    f = httpx.post(f"{auth_url}/v1/files", headers=h("alice"), files={"file": ("t.jsonl", rows)},
                   data={"purpose": "fine-tune"}, timeout=30).json()
    job = httpx.post(f"{auth_url}/v1/fine_tuning/jobs", headers=h("alice"), timeout=30,
                     json={"model": "base", "training_file": f["id"], "suffix": "alices-job",
                           "hyperparameters": {"n_epochs": 50}}).json()
    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "a", seed=6)
    body = {"name": "alices-adapter", "path": adapter, "promote": True, "owner": "alice"}
    assert httpx.post(f"{auth_url}/v1/adapters", headers=h("admin"), json=body, timeout=60).status_code == 200
    ids = {"{file_id}": f["id"], "{job_id}": job["id"], "{name}": "alices-adapter", "{model}": "alices-adapter@1"}

    def alices() -> list:
        def get(path: str):
            r = httpx.get(f"{auth_url}{path}", headers=h("alice"), timeout=30)
            assert r.status_code == 200, (path, r.text)
            return r.json()
        get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")
        get(f"/v1/fine_tuning/jobs/{job['id']}/events")
        return [get(f"/v1/files/{f['id']}"), get(f"/v1/fine_tuning/jobs/{job['id']}")["status"] != "cancelled",
                {m["id"] for m in get("/v1/models")["data"]} >= {"alices-adapter", "alices-adapter@1"}]

    before = alices()
    spec = httpx.get(f"{auth_url}/openapi.json", headers=h("admin"), timeout=30).json()
    tried = []
    for template, ops in spec["paths"].items():
        if not any(k in template for k in ids):
            continue
        path = template
        for key, value in ids.items():
            path = path.replace(key, value)
        for method in ops:
            r = httpx.request(method.upper(), f"{auth_url}{path}", headers=h("bob"), json={"version": 1}, timeout=30)
            assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
            tried.append((method, template))
    assert len(tried) >= 9, tried  # file get/delete, job get/cancel/events/checkpoints, adapter promote/...
    for route in ("/v1/files", "/v1/fine_tuning/jobs"):
        listed = httpx.get(f"{auth_url}{route}", headers=h("bob"), timeout=30).json()["data"]
        assert not {f["id"], job["id"]} & {o["id"] for o in listed}
    assert before == [before[0], True, True] and alices() == before  # bob's cancel and delete changed nothing
    r = httpx.post(f"{auth_url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=h("alice"), timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_a_tenant_never_publishes_into_a_name_it_does_not_own(auth_url, tiny_chat_dir, tmp_path):
    """Checked when the job is created (not after training): another tenant's name and a shared name (whose alias
    a passing eval would move for everyone) answer 404; the reserved 'base' 400; the tenant's own name is fine."""
    from transformers import AutoModelForCausalLM

    from tests.models import make_peft_adapter

    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "s", seed=4)
    for name, owner in (("shared-one", None), ("alices-own", "alice")):
        body = {"name": name, "path": adapter, "promote": True, "owner": owner}
        assert httpx.post(f"{auth_url}/v1/adapters", headers=h("admin"), json=body, timeout=60).status_code == 200
    rows = b'{"prompt": "a", "completion": "b"}\n' * 16

    def job_ids(who: str) -> set[str]:
        r = httpx.get(f"{auth_url}/v1/fine_tuning/jobs", headers=h(who), timeout=30)
        return {j["id"] for j in r.json()["data"]}

    before = {who: job_ids(who) for who in ("alice", "bob")}
    for who in ("alice", "bob"):
        f = httpx.post(f"{auth_url}/v1/files", headers=h(who), files={"file": ("t.jsonl", rows)},
                       data={"purpose": "fine-tune"}, timeout=30).json()
        for suffix, status in (("shared-one", 404), ("alices-own", 404 if who == "bob" else None), ("base", 400)):
            if status is None:
                continue
            r = httpx.post(f"{auth_url}/v1/fine_tuning/jobs", headers=h(who), timeout=30,
                           json={"model": "base", "training_file": f["id"], "suffix": suffix})
            assert r.status_code == status and r.json()["error"]["param"] == "suffix", (who, suffix, r.text)
    assert {who: job_ids(who) for who in ("alice", "bob")} == before  # refused jobs were never queued


HOSTILE = [
    ({"model": "base", "messages": MSG, "n": 10**9}, 400),
    ({"model": "base", "messages": MSG, "n": -1}, 400),
    ({"model": "base", "messages": MSG, "n": "many"}, 400),
    ({"model": "base", "messages": MSG, "max_tokens": 10**12}, 400),
    ({"model": "base", "messages": MSG, "max_tokens": -(10**12)}, 400),
    ({"model": "base", "messages": MSG, "max_tokens": 1.5}, 400),
    ({"model": "base", "messages": MSG, "temperature": -1}, 400),
    ({"model": "base", "messages": MSG, "temperature": 1e308}, 400),
    ({"model": "base", "messages": MSG, "top_p": 2}, 400),
    ({"model": "base", "messages": MSG, "top_k": 0}, 400),
    ({"model": "base", "messages": MSG, "logprobs": True, "top_logprobs": 50}, 400),
    ({"model": "base", "messages": MSG, "logprobs": "yes"}, 400),
    ({"model": "base", "messages": MSG, "top_logprobs": 5}, 400),
    ({"model": "base", "messages": MSG, "presence_penalty": 3.0}, 400),
    ({"model": "base", "messages": MSG, "repetition_penalty": 0}, 400),
    ({"model": "base", "messages": MSG, "min_p": 1.5}, 400),
    ({"model": "base", "messages": MSG, "stop": ["x"] * 50}, 400),
    ({"model": "base", "messages": MSG, "stop": 5}, 400),
    ({"model": "base", "messages": MSG, "seed": "abc"}, 400),
    ({"model": "base", "messages": MSG, "stream": "yes"}, 400),
    ({"model": "base", "messages": MSG, "tools": [{"type": "function"}]}, 400),
    ({"model": "base", "messages": MSG, "chat_template": "{{ cycler.__init__.__globals__ }}"}, 400),
    ({"model": "base", "messages": MSG, "chat_template_kwargs": {"x": 1}}, 400),
    ({"model": "base", "messages": [{"role": "user"}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": None}]}, 400),
    ({"model": "base", "messages": [{"role": "tool", "content": "x"}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "{{ 7*7 }}{% for x in range(10**9) %}{% endfor %}"}],
      "max_tokens": 1}, 200),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}] * 300}, 400),
    ({"model": "base", "messages": "hello"}, 400),
    ({"model": "base", "messages": {"role": "user"}}, 400),
    ({"model": None, "messages": MSG}, 400),
    ({"model": 12, "messages": MSG}, 400),
    ({"model": "../../../etc/passwd", "messages": MSG}, 404),
    ({"model": "base@1", "messages": MSG}, 404),
    ({"model": "a" * 10000, "messages": MSG}, 404),
    ({"model": "x\u0000y", "messages": MSG}, 404),
    ({"model": "base", "messages": [{"role": "user", "content": "nul\u0000byte"}], "max_tokens": 1}, 200),
    ({"model": "base", "prompt": [[1, 2], [10**9]]}, 400),
    ({"model": "base", "prompt": [-5]}, 400),
    ({"model": "base", "prompt": [[]]}, 400),
    ({"model": "base", "prompt": "x", "max_tokens": 0}, 400),  # 0 only with echo
    ({"model": "base", "prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 1}, 200),
    ({"model": "base", "messages": MSG, "tool_choice": "required"}, 400),  # no tools
    ({"model": "base", "messages": [{"role": "tool", "content": "x"}]}, 400),  # no tool_call_id
    ({"model": "base", "messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400),
    ({"model": "base", "prompt": "x", "logprobs": 10}, 400),
    ({"model": "base", "prompt": {"a": 1}}, 400),
]


@pytest.mark.parametrize("body, status", HOSTILE)
def test_hostile_json_gets_a_deliberate_answer(auth_url, body, status):
    route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(f"{auth_url}{route}", headers=h("alice"), json=body, timeout=60)
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw, status", [
    (b"\xff\xfe\xfa", 400),
    (b'{"model": "base", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),
    (b"[" * 100000 + b"]" * 100000, 400),
    (b'{"model": "base", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b"", 400),
    (b"null", 400),
    (b'{"model": "base", "messages": [], "model": "other"}', 400),
    (b'{"model": "base", "messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}', 413),
])
def test_hostile_bytes_never_500(auth_url, raw, status):
    r = httpx.post(f"{auth_url}/v1/chat/completions", headers={**h("alice"), "content-type": "application/json"},
                   content=raw, timeout=60)
    assert r.status_code == status, r.text[:300]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_overload_is_shed_fast_while_admitted_requests_finish(ray_cluster, app_args, tmp_path):
    from llmaas.deployments.config import AppConfig
    from llmaas.deployments.llm_server import LLMServer
    from llmaas.deployments.router import Router
    from llmaas.deployments.tokenizer import Tokenizer

    cfg = AppConfig.model_validate({**app_args, "storage_root": str(tmp_path)})
    app = Router.options(max_ongoing_requests=1, max_queued_requests=1).bind(
        Tokenizer.bind(cfg), LLMServer.bind(cfg), cfg)
    serve.run(app, name="bp-app", route_prefix="/bp")
    url = f"{ray_cluster}/bp/v1/chat/completions"
    body = {"model": "base", "messages": MSG, "max_tokens": 60, "ignore_eos": True}
    try:
        httpx.post(url, json={**body, "max_tokens": 1}, timeout=60).raise_for_status()  # warm

        def one(_):
            t = time.monotonic()
            r = httpx.post(url, json=body, timeout=60)
            return r.status_code, time.monotonic() - t, r.headers.get("retry-after")

        with cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        codes = sorted(c for c, _, _ in results)
        # Serve admits 1 running + 1 queued; which of 4 simultaneous arrivals get those seats (and whether the
        # queued one is still counted when the next arrives) is Serve's timing, so we pin: some succeed, the
        # rest are shed with 503 quickly, nothing else.
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, results
        shed = [(d, ra) for c, d, ra in results if c == 503]
        assert shed and all(d < 2.0 for d, _ in shed), results
    finally:
        serve.delete("bp-app")


def test_killed_model_replica_gives_clean_errors_and_recovers(ray_cluster, default_model_dir, tmp_path):
    import ray

    # The real default model on one thread: 2000 tokens cannot finish before the kill lands; the error the
    # client reads must be the replica's death (503 replica_died, in-band), not the 600 s request timeout.
    serve.run(build_app({"engine": {"torch_threads": 1, "kv_cache_memory_gb": 0.1}, "storage_root": str(tmp_path)}),
              name="kill-app", route_prefix="/kill")
    url = f"{ray_cluster}/kill/v1/chat/completions"
    body = {"model": "base", "messages": MSG, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    try:
        httpx.post(url, json={**body, "stream": False, "max_tokens": 1}, timeout=60).raise_for_status()

        streaming = threading.Event()

        def stream_until_killed():
            lines = []
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if '"content":"' in line:
                        streaming.set()
            return lines

        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(stream_until_killed)
            assert streaming.wait(30)
            # the replica running the stream (on a loaded box Serve may have started a second one meanwhile)
            busy = {rid for rid, st in engine_stats("kill-app", replicas=2, tries=5).items() if st["running"] > 0}
            victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
                       if "kill-app" in a["name"] and "LLMServer" in a["name"] and any(b in a["name"] for b in busy)]
            assert len(victims) == 1, (busy, ray.util.list_named_actors(all_namespaces=True))
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
            killed = time.monotonic()
            lines = fut.result(timeout=90)  # never a hang
            told_after = time.monotonic() - killed
        tokens = sum('"content":"' in ln for ln in lines)
        assert "data: [DONE]" in lines[-3:]
        errors = [json.loads(ln[6:])["error"] for ln in lines if ln.startswith('data: {"error"')]
        assert tokens < 2000 and [e["code"] for e in errors] == ["replica_died"], lines[-4:]  # cut short, said why
        assert told_after < 30, told_after
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            r = httpx.post(url, json={**body, "stream": False, "max_tokens": 2}, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code in (500, 503), r.text  # the proxy may answer while Serve replaces the replica
            time.sleep(1)
        results = [httpx.post(url, json={**body, "stream": False, "max_tokens": 2}, timeout=60).status_code
                   for _ in range(5)]
        assert results == [200] * 5
    finally:
        serve.delete("kill-app")


def test_with_keys_the_prefix_cache_is_per_tenant(auth_url):
    """No tenant can learn another's prompt from cache-hit timing: with keys configured the prefix cache is
    scoped per tenant (engine.prefix_cache_scope defaults to tenant), while a tenant still reuses its own."""
    llm = serve.get_deployment_handle("LLMServer", app_name="auth-app")

    def cached() -> int:
        return llm.stats.remote().result()["prefix_cached_tokens"]

    secret = [{"role": "user", "content": "the merger closes on friday at nine, tell nobody " * 4}]

    def ask(who: str, max_tokens: int) -> None:  # max_tokens differ: the response cache never answers
        r = httpx.post(f"{auth_url}/v1/chat/completions", headers=h(who), timeout=60,
                       json={"model": "base", "messages": secret, "max_tokens": max_tokens})
        assert r.status_code == 200, r.text

    ask("alice", 1)
    start = cached()
    ask("bob", 2)
    assert cached() == start  # bob's identical prompt found none of alice's blocks
    ask("alice", 3)
    assert cached() > start  # alice reuses her own


def usage(url: str, who: str, **params) -> dict:
    r = httpx.get(f"{url}/v1/usage", headers=h(who), params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_usage_is_metered_exactly_per_tenant_and_survives_a_restart(auth_url, auth_storage, metrics_url, capsys,
                                                                    monkeypatch):
    import openai
    import ray

    from llmaas.deployments.cli import main as cli
    from llmaas.deployments.registry_service import actor_name

    carol = openai.OpenAI(base_url=f"{auth_url}/v1", api_key=KEYS["carol"], max_retries=0, timeout=60)
    long = [{"role": "user", "content": "please meter every token of this request " * 6}]
    answers = [carol.chat.completions.create(model="tiny-chat", messages=long, max_tokens=5, n=2, seed=1)]
    answers.append(carol.chat.completions.create(model="tiny-chat", messages=long, max_tokens=3, temperature=0))
    stream = carol.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=4, stream=True,
                                           stream_options={"include_usage": True})
    answers.append([c for c in stream][-1])
    answers.append(carol.completions.create(model="tiny-chat", prompt=["one two", "three"], max_tokens=2))
    got = [a.usage for a in answers]
    assert got[1].prompt_tokens_details.cached_tokens >= 32  # the same prompt again: its blocks were cached

    mine = usage(auth_url, "carol")
    assert [(r["tenant"], r["model"]) for r in mine["data"]] == [("carol", "tiny-chat")]
    expected = {"requests": 4, "prompt_tokens": sum(u.prompt_tokens for u in got),
                "completion_tokens": sum(u.completion_tokens for u in got),
                "cached_tokens": sum(u.prompt_tokens_details.cached_tokens for u in got)}
    assert {k: mine["total"][k] for k in expected} == expected

    httpx.post(f"{auth_url}/v1/chat/completions", headers=h("bob"), timeout=60,
               json={"model": "tiny-chat", "messages": MSG, "max_tokens": 1}).raise_for_status()
    assert {r["tenant"] for r in usage(auth_url, "bob")["data"]} == {"bob"}  # a tenant sees its own only
    r = httpx.get(f"{auth_url}/v1/usage", headers=h("bob"), params={"tenant": "carol"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    everyone = {row["tenant"] for row in usage(auth_url, "admin", group_by="tenant")["data"]}
    assert {"bob", "carol"} <= everyone
    assert usage(auth_url, "admin", tenant="carol")["total"] == mine["total"]
    r = httpx.get(f"{auth_url}/v1/usage", headers=h("carol"), params={"group_by": "secret"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "group_by"

    # the tenant label on Prometheus counts what the ledger counts
    assert wait_until(lambda: metric_total(metrics_url, "ray_llmaas_completion_tokens_total", tenant="carol")
                      == expected["completion_tokens"], 60, every=1.0)

    service = ray.get_actor(actor_name("usage", auth_storage), namespace="llmaas")
    ray.kill(service, no_restart=False)  # the ledger's actor dies; it comes back from what it stored
    assert wait_until(lambda: _usage_or_none(auth_url, "carol") == mine, 60, every=0.5)

    # the README's two lines, as written (the server and the key from the environment they name)
    curl_line, cli_line = readme_usage_lines()
    url = shlex.split(curl_line)[2].replace("http://127.0.0.1:8000", auth_url)
    answer = httpx.get(url, headers=h("carol"), timeout=30).json()
    assert answer["data"] == mine["data"]
    monkeypatch.setenv("LLMAAS_URL", auth_url)
    monkeypatch.setenv("LLMAAS_API_KEY", KEYS["carol"])
    assert cli(shlex.split(cli_line, comments=True)[1:]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["start_time", "tenant", "model", "requests"]  # --bucket 1d: a row per day
    assert table[1].split()[1:5] == ["carol", "tiny-chat", "4", str(expected["prompt_tokens"])]
    assert table[-1].split()[:3] == ["total", "4", str(expected["prompt_tokens"])]


def readme_usage_lines() -> tuple[str, str]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("**Usage metering.**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    curl_line, cli_line = block.strip().splitlines()
    assert curl_line.startswith("curl ") and cli_line.startswith("llmaas usage ")
    return curl_line, cli_line


def _usage_or_none(url: str, who: str) -> dict | None:
    r = httpx.get(f"{url}/v1/usage", headers=h(who), timeout=30)
    return r.json() if r.status_code == 200 else None
