"""Hot-swap under steady load: time from an alias move to the first token from the new version.

    python -m llmaas.benchmarks.hotswap --clients 4 --moves 6 --window 8
    python -m llmaas.benchmarks.hotswap --storage s3     # storage_root on an S3-compatible server (moto, loopback)

Serves the default model with two LoRA adapter versions (random PEFT adapters, r=8,
all projections) of one name, keeps N streaming clients busy on the alias, moves the
alias back and forth, and reports p50/p99 of move -> first token of the new version
(it includes a whole request's TTFT, printed beside it for comparison),
throughput during the swaps vs before them, and failed requests (must be 0). With
``--storage s3`` everything (registry, adapters) lives in a bucket on a local S3-compatible
server, and the run also times the cold pull of a version from the bucket (download +
checksum, in this process) and the first request for a never-served version against a
repeat of it (cold: pull + slot load).
The clients warm up first: the run starts once as many requests as there are clients
have finished (the cold start), so the "before" window is a warm steady state. Every
request sent is counted, warm-up and last-second ones included: the run ends only when
all of them have. Saves benchmarks/results/hotswap.{json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmaas.benchmarks.common import RESULTS, failure, percentile, print_table, save, stream_chunks


@dataclass
class Req:
    start: float
    model: str = ""
    first_token: float | None = None
    tokens: int = 0
    error: str | None = None  # why it failed; None: it finished
    end: float = 0.0


async def one_request(http, url: str, body: dict) -> Req:
    req = Req(time.perf_counter())
    try:
        async for chunk in stream_chunks(http, f"{url}/v1/chat/completions", body):
            req.model = chunk["model"]
            if chunk.get("usage"):
                req.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and req.first_token is None:
                req.first_token = time.perf_counter()
    except Exception as exc:  # transport errors, failure answers, malformed events: all counted
        req.error = failure(exc)
    req.end = time.perf_counter()
    return req


async def run(url: str, args) -> tuple[list[Req], list[tuple[float, str]], float]:
    """Returns every request (warm-up included), the moves (time, new version) and the measured run's start."""
    import httpx

    log: list[Req] = []
    moves: list[tuple[float, str]] = []
    stop_at = math.inf  # set once the clients are warm
    body = {"model": "hs", "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}

    async def client(http) -> None:
        while time.perf_counter() < stop_at:
            log.append(await one_request(http, url, body))

    async with httpx.AsyncClient(timeout=120) as http:
        clients = [asyncio.create_task(client(http)) for _ in range(args.clients)]
        while len(log) < args.clients:  # the cold start: first adapter load, first batches
            await asyncio.sleep(0.05)
        start = time.perf_counter()
        stop_at = start + args.window * (args.moves + 1)
        for i in range(args.moves):
            await asyncio.sleep(args.window)
            target = 2 if i % 2 == 0 else 1
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/adapters/hs/promote", json={"version": target}, timeout=60)
            r.raise_for_status()
            moves.append((t, f"hs@{target}"))
        await asyncio.gather(*clients)  # every request in flight at stop_at finishes and is counted
    return log, moves, start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--moves", type=int, default=6)
    p.add_argument("--window", type=float, default=8.0, help="seconds between alias moves")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--storage", choices=["local", "s3"], default="local",
                   help="storage_root: a temp dir, or a bucket on a moto S3 server started on loopback")
    args = p.parse_args()

    import httpx
    import ray
    from ray import serve
    from transformers import AutoModelForCausalLM

    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import resolve_model
    from llmaas.deployments.builder import build_app
    from tests.models import make_peft_adapter

    scratch = tempfile.mkdtemp(prefix="llmaas-hotswap-")
    storage, stop_s3 = scratch, None
    if args.storage == "s3":  # before ray.init: Ray's workers inherit the AWS_* environment
        from tests.s3server import make_bucket, s3_env, start_moto_server

        endpoint, stop_s3 = start_moto_server()
        os.environ.update(s3_env(endpoint))
        make_bucket(endpoint, "hotswap")
        storage = "s3://hotswap/llmaas"
    base_path = resolve_model(ModelSettings()).path
    base = AutoModelForCausalLM.from_pretrained(base_path)
    adapters = [make_peft_adapter(base, f"{scratch}/src{i}", seed=i, b_std=0.05) for i in range(3)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app({"engine": {"torch_threads": 2}, "storage_root": storage}), name="hotswap",
              route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    for i, path in enumerate(adapters[:2]):
        httpx.post(f"{url}/v1/adapters", json={"name": "hs", "path": path, "promote": i == 0},
                   timeout=60).raise_for_status()
    log, moves, start = asyncio.run(run(url, args))
    cold = cold_version(url, storage, adapters[2], scratch)
    serve.shutdown()
    ray.shutdown()
    if stop_s3 is not None:
        stop_s3()

    row, errors, delays = summarize(log, moves, start, args.window)
    row = {"storage": args.storage, **row, **cold}
    print_table([row], list(row))
    print("failures:", dict(errors) or "none")
    name = "hotswap" if args.storage == "local" else f"hotswap_{args.storage}"
    path = save(name, {"args": vars(args), "row": row, "delays_s": delays, "errors": dict(errors)})
    plot(log, moves, start, name)
    print("saved", path)


def cold_version(url: str, storage: str, adapter: str, scratch: str) -> dict:
    """Registers a third version and times (a) pulling it from storage into an empty cache in this process and
    (b) the first request for it (the replica pulls it and loads a slot) against a repeat of that request."""
    import httpx

    from llmaas.app.adapter_cache import AdapterCache
    from llmaas.app.registry import Registry

    httpx.post(f"{url}/v1/adapters", json={"name": "hs", "path": adapter}, timeout=60).raise_for_status()
    registry = Registry(storage)
    version = registry.version("hs", 3)
    cache = AdapterCache(registry.storage, Path(scratch) / "pull", max_bytes=1 << 30)
    t = time.perf_counter()
    cache.path(version)
    pull_ms = (time.perf_counter() - t) * 1e3
    body = {"model": "hs@3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    first_ms = []
    for _ in range(2):
        t = time.perf_counter()
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).raise_for_status()
        first_ms.append((time.perf_counter() - t) * 1e3)
    size = sum(len(registry.storage.read(f"{version.path}/{f}")) for f in version.files)
    return {"pull_ms": round(pull_ms, 1), "version_mb": round(size / 1e6, 2), "downloaded": cache.pulls == 1,
            "cold_request_ms": round(first_ms[0], 1), "warm_request_ms": round(first_ms[1], 1)}


def summarize(log: list[Req], moves: list[tuple[float, str]], start: float, window: float):
    """The result row, the failures by reason, and the move -> first-token-of-new-version delays."""
    delays = []
    for t, version in moves:
        firsts = [r.first_token for r in log if r.model == version and r.start >= t and r.first_token]
        if firsts:
            delays.append(min(firsts) - t)
    done = [r for r in log if r.error is None]
    errors = collections.Counter(r.error for r in log if r.error is not None)

    def tok_s(t0: float, t1: float) -> float:
        """Tokens of the requests that finished in [t0, t1), per second."""
        return sum(r.tokens for r in done if t0 <= r.end < t1) / (t1 - t0)

    before = tok_s(start, moves[0][0])
    during = sum(tok_s(t, t + window) for t, _ in moves) / len(moves)
    ttft = [r.first_token - r.start for r in done if r.first_token and r.start >= start]
    row = {"moves": len(moves), "move_to_new_version_p50_ms": percentile(delays, 50) * 1e3,
           "move_to_new_version_p99_ms": percentile(delays, 99) * 1e3,
           "ttft_p50_ms_all_requests": percentile(ttft, 50) * 1e3, "tok_s_before": before,
           "tok_s_during_swaps": during, "ratio": during / before, "requests": len(log),
           "warmup_requests": sum(r.start < start for r in log), "failed": sum(errors.values())}
    return row, errors, delays


def plot(log: list[Req], moves: list[tuple[float, str]], start: float, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    for y, (version, color) in enumerate((("hs@1", "tab:blue"), ("hs@2", "tab:orange")), start=1):
        xs = [r.first_token - start for r in log if r.error is None and r.model == version and r.first_token]
        ax.scatter(xs, [y] * len(xs), s=6, color=color, label=version)
    for t, _ in moves:
        ax.axvline(t - start, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("seconds (dashed: alias moves; before 0: warm-up)")
    ax.set_yticks([1, 2], ["hs@1", "hs@2"])
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)

if __name__ == "__main__":
    main()
