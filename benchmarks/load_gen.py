"""Overload behaviour: N concurrent clients, a fixed number of requests, limits on the ingress.

    python -m llmaas.benchmarks.load_gen --clients 16 --requests 64 --max-ongoing 4 --max-queued 4
    python -m llmaas.benchmarks.load_gen --clients 16 --requests 64 --max-ongoing 64 --max-queued 64 --rpm 20

Loopback only, bounded in count and time. Reports goodput (completion tokens/s of
successful requests), latency p50/p99 of successes, and every status seen: all non-2xx
must be the deliberate 429/503 of load shedding. Uses the tiny random chat model
unless --model-source is given, so it measures the serving path, not the model.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path

from llmaas.benchmarks.common import model_source, percentile, print_table, save


async def run(url: str, args) -> tuple[list[tuple[int, float, int]], float]:
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    results: list[tuple[int, float, int]] = []
    body = {"model": "base", "messages": [{"role": "user", "content": "count"}], "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            t = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/chat/completions", json=body)
                tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                results.append((r.status_code, time.perf_counter() - t, tokens))
            except httpx.HTTPError:
                results.append((0, time.perf_counter() - t, 0))  # 0: transport error (never deliberate)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(args.clients))), args.deadline)
    return results, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-ongoing", type=int, default=4, help="Router max_ongoing_requests")
    p.add_argument("--max-queued", type=int, default=4, help="Router max_queued_requests")
    p.add_argument("--rpm", type=float, default=None, help="rate limit (requests/minute) for the keyless tenant")
    p.add_argument("--model-source", default=None)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--deadline", type=float, default=300, help="the whole run stops by then")
    p.add_argument("--port", type=int, default=8767)
    args = p.parse_args()

    import ray
    from ray import serve

    from llmaas.deployments.config import AppConfig
    from llmaas.deployments.llm_server import LLMServer
    from llmaas.deployments.router import Router
    from llmaas.deployments.tokenizer import Tokenizer

    work = tempfile.mkdtemp(prefix="llmaas-load-")
    source = model_source(args.model_source, Path(work))
    cfg = AppConfig.model_validate({"model": {"source": source}, "storage_root": f"{work}/storage",
                                    "engine": {"torch_threads": 2},
                                    "rate_limits": {"requests_per_minute": args.rpm}})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Router.options(max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued).bind(
        Tokenizer.bind(cfg), LLMServer.bind(cfg), cfg), name="load", route_prefix="/")
    results, wall = asyncio.run(run(f"http://127.0.0.1:{args.port}", args))
    serve.shutdown()
    ray.shutdown()
    ok = [r for r in results if r[0] == 200]
    statuses = dict(sorted(collections.Counter(r[0] for r in results).items()))
    row = {"requests": len(results), "ok": len(ok), "shed_429_503": sum(r[0] in (429, 503) for r in results),
           "failed_other": sum(r[0] not in (200, 429, 503) for r in results),
           "goodput_tok_s": sum(r[2] for r in ok) / wall, "p50_ms": percentile([r[1] for r in ok], 50) * 1e3,
           "p99_ms": percentile([r[1] for r in ok], 99) * 1e3,
           "shed_p99_ms": percentile([r[1] for r in results if r[0] in (429, 503)], 99) * 1e3}
    print_table([row], list(row))
    print("statuses:", statuses)
    name = "load_gen" + ("_rate_limited" if args.rpm else "")
    print("saved", save(name, {"args": vars(args), "row": row, "statuses": statuses}))


if __name__ == "__main__":
    main()
