"""Graceful drain: in-flight streams finish when their replicas are scaled down, replaced or shut down."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest
from ray import serve

from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer
from tests.integration.conftest import assert_aborted_and_freed, engine_stats, release_root_actors, wait_until

MSG = [{"role": "user", "content": "hi"}]
TOKENS = 1200  # tens of seconds per stream: still running when a replica is STOPPING (asserted)


def _app(cfg: AppConfig, model_replicas: int):
    drain = {"graceful_shutdown_timeout_s": 300, "graceful_shutdown_wait_loop_s": 0.5}  # > the longest stream, loaded
    return Router.options(**drain).bind(
        Tokenizer.options(**drain).bind(cfg),
        LLMServer.options(num_replicas=model_replicas, ray_actor_options={"num_cpus": 0.5}, **drain).bind(cfg), cfg)


def _stream(url: str, started: threading.Event | None = None) -> dict:
    """One long stream; returns its usage and whether anything went wrong in-band."""
    body = {"model": "tiny-long", "messages": MSG, "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out = {"errors": [], "finish": None, "usage": None}
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["errors"].append(chunk["error"])
                continue
            if started is not None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                started.set()
            for c in chunk["choices"]:
                out["finish"] = c.get("finish_reason") or out["finish"]
            out["usage"] = chunk.get("usage") or out["usage"]
    return out


def _busy_replicas(app: str, tries: int = 40) -> set[str]:
    """Replica ids of LLMServers running requests right now (stats calls land on random replicas)."""
    handle = serve.get_deployment_handle("LLMServer", app_name=app)
    seen = set()
    for _ in range(tries):
        s = handle.stats.remote().result()
        if s["running"] > 0:
            seen.add(s["replica"])
    return seen


def _assert_completed(results: list[dict]) -> None:
    for res in results:
        assert res["status"] == 200 and not res["errors"], res
        assert res["finish"] == "length" and res["usage"]["completion_tokens"] == TOKENS, res


@pytest.fixture(scope="module")
def long_app(ray_cluster, app_args, tiny_long_chat_dir, tmp_path_factory):
    """Two model replicas of the 2k-context tiny model, default request timeout (600 s)."""
    cfg = AppConfig.model_validate({**app_args, "model": {"source": str(tiny_long_chat_dir),
                                                          "served_name": "tiny-long"},
                                    "storage_root": str(tmp_path_factory.mktemp("drain-storage")),
                                    "response_cache_size": 0})
    serve.run(_app(cfg, 2), name="drain-app", route_prefix="/drain")
    yield cfg, f"{ray_cluster}/drain/v1/chat/completions"
    if "drain-app" in serve.status().applications:
        serve.delete("drain-app")
    release_root_actors(cfg.storage_root)


def test_client_hanging_up_on_a_non_streaming_request_frees_the_engine(long_app):
    _, url = long_app
    before = engine_stats("drain-app", replicas=2)
    assert len(before) == 2  # both replicas' counters: the request may land on either
    body = {"model": "tiny-long", "messages": MSG, "max_tokens": 1900, "ignore_eos": True, "n": 2}
    with pytest.raises(httpx.ReadTimeout):  # gives up long before 2 x 1900 tokens (or the 600 s timeout)
        httpx.post(url, json=body, timeout=1.0)
    assert_aborted_and_freed("drain-app", before, aborted=2, within=2.0)  # both choices, blocks back


def test_client_hanging_up_mid_stream_frees_the_engine(long_app):
    _, url = long_app
    before = engine_stats("drain-app", replicas=2)
    assert len(before) == 2  # both replicas' counters: the request may land on either

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": "tiny-long", "messages": MSG, "max_tokens": 1900, "stream": True, "ignore_eos": True}
            async with c.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                        break  # a real token arrived: hang up now

    asyncio.run(go())
    assert_aborted_and_freed("drain-app", before, aborted=1, within=2.0)


def model_replicas() -> dict:
    return dict(serve.status().applications["drain-app"].deployments["LLMServer"].replica_states)


def test_in_flight_streams_finish_through_scale_down_and_shutdown(long_app):
    cfg, url = long_app
    with cf.ThreadPoolExecutor(7) as pool:
        started = [threading.Event() for _ in range(6)]
        futures = [pool.submit(_stream, url, ev) for ev in started]
        assert all(ev.wait(60) for ev in started)
        busy = _busy_replicas("drain-app")
        assert busy
        redeploy = pool.submit(serve.run, _app(cfg, 1), name="drain-app", route_prefix="/drain")  # 2 -> 1, new
        assert wait_until(lambda: "STOPPING" in model_replicas(), 60, every=0.1), model_replicas()
        assert not any(f.done() for f in futures)  # a replica is being stopped under streams still running
        redeploy.result(timeout=180)
        _assert_completed([f.result(timeout=120) for f in futures])

    deadline = time.monotonic() + 60
    while model_replicas() != {"RUNNING": 1}:  # the old replicas are gone, one new one runs
        assert time.monotonic() < deadline, model_replicas()
        time.sleep(0.5)
    survivor = {serve.get_deployment_handle("LLMServer", app_name="drain-app").stats.remote().result()["replica"]}
    assert busy - survivor, (busy, survivor)  # a replica holding in-flight streams was stopped under them

    with cf.ThreadPoolExecutor(3) as pool:  # shutdown: delete the app under load
        started = [threading.Event() for _ in range(3)]
        futures = [pool.submit(_stream, url, ev) for ev in started]
        assert all(ev.wait(60) for ev in started)
        serve.delete("drain-app", _blocking=False)
        time.sleep(1.0)
        assert not any(f.done() for f in futures)  # deleting did not cut them
        _assert_completed([f.result(timeout=120) for f in futures])
