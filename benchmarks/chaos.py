"""One hostile client must not hurt the well-behaved ones.

    python -m llmaas.benchmarks.chaos --clients 4 --seconds 30

N well-behaved clients stream chat completions for T seconds, alone (calm), then again while one
hostile client sends a random mix of malformed and abusive requests (values that would overflow
the engine, fan-out, chunked oversized bodies, broken JSON, unknown models, over-long ids) as
fast as it is answered. Loopback only; every loop is bounded by its phase's time. Prints, from
one run: well-behaved requests failed (must be 0), 5xx seen anywhere (must be 0), and the
well-behaved p99 latency with the hostile client over without it. Uses the tiny random chat
model unless --model-source is given, so it measures the serving path, not the model.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import tempfile
import time
from pathlib import Path

from llmaas.benchmarks.common import model_source, percentile, print_table, save

MSG = [{"role": "user", "content": "hi"}]
HUGE = 1 << 70


def _chat(**extra) -> tuple[str, str, dict]:
    return "POST", "/v1/chat/completions", {"model": "base", "messages": MSG, "max_tokens": 4, **extra}


def _chunked(size: int):
    async def body():
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b'"}]}'
    return body


HOSTILE = [
    _chat(top_k=1 << 63), _chat(seed=1 << 64), _chat(seed=-HUGE), _chat(max_tokens=HUGE), _chat(n=10**30),
    _chat(logprobs=True, top_logprobs=HUGE), _chat(stop="x" * 5000), _chat(stop=["x"] * 50),
    _chat(temperature=float("nan")), _chat(messages=[{"role": "user", "content": "x"}] * 300), _chat(model="a" * 10000),
    _chat(model="nobody@1"), _chat(tools=[{"type": "function"}]),
    ("POST", "/v1/completions", {"model": "base", "prompt": [HUGE], "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "base", "prompt": ["hi"] * 20000, "n": 8, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "base", "prompt": [[1, 2], [3, -HUGE]]}),
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", b"[" * 50000 + b"]" * 50000),
    ("POST", "/v1/chat/completions", _chunked(8 << 20)),
    ("GET", "/v1/files/file-" + "a" * 300, None),
    ("GET", "/v1/fine_tuning/jobs/ftjob-" + "a" * 300 + "/events", None),
    ("POST", "/v1/fine_tuning/jobs", {"model": "base", "training_file": "file-nope", "suffix": "base"}),
]


async def well_behaved(http, url: str, stop_at: float, max_tokens: int, out: list[tuple[bool, float]]) -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "count to ten"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    while time.monotonic() < stop_at:
        t, ok = time.perf_counter(), False
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                done = error = False
                async for line in r.aiter_lines():
                    done |= line == "data: [DONE]"
                    error |= line.startswith("data: {\"error\"")
                ok = r.status_code == 200 and done and not error
        except Exception:  # transport error: a failure like any other
            ok = False
        out.append((ok, time.perf_counter() - t))


async def hostile(http, url: str, stop_at: float, rng: random.Random, statuses: collections.Counter) -> None:
    while time.monotonic() < stop_at:
        method, path, body = rng.choice(HOSTILE)
        kwargs = {}
        if isinstance(body, dict):
            kwargs["content"] = json.dumps(body).encode()
        elif isinstance(body, bytes):
            kwargs["content"] = body
        elif body is not None:
            kwargs["content"] = body()
        try:
            r = await http.request(method, f"{url}{path}", headers={"content-type": "application/json"}, **kwargs)
            statuses[r.status_code] += 1
        except Exception:
            statuses[0] += 1  # transport error (e.g. the server closing an oversized upload)


async def phase(url: str, args, with_hostile: bool) -> tuple[list[tuple[bool, float]], collections.Counter]:
    import httpx

    results: list[tuple[bool, float]] = []
    statuses: collections.Counter = collections.Counter()
    stop_at = time.monotonic() + args.seconds
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        tasks = [well_behaved(http, url, stop_at, args.max_tokens, results) for _ in range(args.clients)]
        if with_hostile:
            tasks.append(hostile(http, url, stop_at, random.Random(args.seed), statuses))
        await asyncio.wait_for(asyncio.gather(*tasks), args.seconds + args.timeout + 30)
    return results, statuses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="well-behaved streaming clients")
    p.add_argument("--seconds", type=float, default=30, help="length of each phase (calm, then hostile)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the hostile client's choice of requests")
    p.add_argument("--model-source", default=None)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--port", type=int, default=8768)
    args = p.parse_args()

    import ray
    from ray import serve

    from llmaas.deployments.builder import build_app

    work = tempfile.mkdtemp(prefix="llmaas-chaos-")
    source = model_source(args.model_source, Path(work))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app({"model": {"source": source}, "storage_root": f"{work}/storage",
                         "engine": {"torch_threads": 2}, "max_upload_mb": 1}), name="chaos", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    try:
        calm, _ = asyncio.run(phase(url, args, with_hostile=False))
        stormy, statuses = asyncio.run(phase(url, args, with_hostile=True))
    finally:
        serve.shutdown()
        ray.shutdown()
    p99 = {name: percentile([t for ok, t in rs if ok], 99) * 1e3 for name, rs in (("calm", calm), ("hostile", stormy))}
    row = {"well_behaved_requests": len(calm) + len(stormy),
           "well_behaved_failed": sum(not ok for ok, _ in calm + stormy),
           "hostile_requests": sum(statuses.values()), "5xx_seen": sum(n for s, n in statuses.items() if s >= 500),
           "p99_calm_ms": p99["calm"], "p99_hostile_ms": p99["hostile"],
           "p99_ratio": p99["hostile"] / p99["calm"]}
    print_table([row], list(row))
    print("hostile statuses:", dict(sorted(statuses.items())))
    print("saved", save("chaos", {"args": vars(args), "row": row, "hostile_statuses": dict(statuses)}))


if __name__ == "__main__":
    main()
