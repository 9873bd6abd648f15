"""The response cache in its own app: a repeat is answered without the engine, and never across tenants,
adapter versions or non-deterministic requests. The shared app runs with the cache off."""
from __future__ import annotations

import httpx
import pytest
from ray import serve

from llmaas.deployments.builder import build_app
from tests.integration.conftest import engine_stats, release_root_actors
from tests.integration.test_metrics import scrape
from tests.models import make_peft_adapter

APP = "cache-app"
KEYS = {"alice": "alice-cache-key-000001", "bob": "bobs-cache-key-0000002", "admin": "admin-cache-key-000003"}
MSG = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def cache_url(ray_cluster, app_args, tmp_path_factory):
    args = {**app_args, "storage_root": str(tmp_path_factory.mktemp("cache-storage")), "response_cache_size": 64,
            "auth": {"api_keys": [{"key": KEYS["alice"], "tenant": "alice"}, {"key": KEYS["bob"], "tenant": "bob"},
                                  {"key": KEYS["admin"], "tenant": "ops", "admin": True}]}}
    serve.run(build_app(args), name=APP, route_prefix="/cache")
    yield f"{ray_cluster}/cache"
    serve.delete(APP)
    release_root_actors(args["storage_root"])


def admitted() -> int:
    """Requests the engine has admitted: a cache hit adds none."""
    (stats,) = engine_stats(APP).values()
    return stats["requests_admitted"]


def ask(url: str, who: str, **body) -> dict:
    body = {"model": "base", "messages": MSG, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **body}
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[who]}"}, json=body,
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeat_is_a_hit_and_other_tenants_miss(cache_url, metrics_url):
    start = admitted()
    first = ask(cache_url, "alice")
    assert admitted() == start + 1  # miss: the engine ran it
    second = ask(cache_url, "alice")
    assert admitted() == start + 1  # hit: the engine did not
    assert second["choices"] == first["choices"] and second["id"] != first["id"]
    ask(cache_url, "bob")
    assert admitted() == start + 2  # the same request from another tenant is not alice's answer
    ask(cache_url, "alice", max_tokens=5)
    assert admitted() == start + 3  # any field of the request is in the key
    assert scrape(metrics_url, r'^ray_llmaas_response_cache_total\{.*result="hit"')
    assert scrape(metrics_url, r'^ray_llmaas_response_cache_total\{.*result="miss"')


def test_seeded_sampling_is_cached_and_unseeded_never(cache_url):
    start = admitted()
    seeded = [ask(cache_url, "alice", temperature=1.0, seed=7) for _ in range(2)]
    assert seeded[0]["choices"] == seeded[1]["choices"] and admitted() == start + 1
    for _ in range(2):
        ask(cache_url, "alice", temperature=1.0)
    assert admitted() == start + 3  # no seed: every call samples anew


def test_an_alias_move_is_never_answered_from_the_old_version(cache_url, tiny_chat_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    for seed in (1, 2):
        path = make_peft_adapter(base, tmp_path / f"a{seed}", seed=seed, b_std=1.0)
        r = httpx.post(f"{cache_url}/v1/adapters", headers=admin, timeout=60,
                       json={"name": "moody", "path": path, "promote": True})
        assert r.status_code == 200, r.text
        if seed == 1:
            v1 = ask(cache_url, "alice", model="moody")
            assert v1["model"] == "moody@1"
            assert ask(cache_url, "alice", model="moody")["choices"] == v1["choices"]  # cached while @1 is current
    start = admitted()
    v2 = ask(cache_url, "alice", model="moody")
    assert v2["model"] == "moody@2" and admitted() == start + 1  # a miss: the alias now means version 2
    assert v2["choices"][0]["message"]["content"] != v1["choices"][0]["message"]["content"]
