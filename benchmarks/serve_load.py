"""Serve overhead: the bare engine, the async engine in-process and the HTTP path, same workload, one run.

    python -m llmaas.benchmarks.serve_load --concurrency 1 8 --requests 16 --prompt-tokens 128 --max-tokens 64
    python -m llmaas.benchmarks.serve_load --concurrency 8 --metering-cost   # + the HTTP path with metering off
    python -m llmaas.benchmarks.serve_load --encryption-cost   # adapter load, encrypted root vs clear root
    python -m llmaas.benchmarks.serve_load --model-source tiny --stream-interval-ms 50   # + batched deltas
    python -m llmaas.benchmarks.serve_load --model-source tiny --serve-defaults   # + Serve's default threading
    python -m llmaas.benchmarks.serve_load --concurrency 8 --burst-gather-ms 10   # + an idle engine gathers bursts
    python -m llmaas.benchmarks.serve_load --router-work   # the Router's own Python work per streamed token

Three paths, each at every --concurrency level:
- bare engine: ``LLMEngine`` stepped in this thread (the ceiling: no asyncio, no Ray);
- engine in-process: ``AsyncLLMEngine`` (its own engine thread) driven from this process's event loop;
- serve: ``serve run`` of the default config, streaming ``/v1/completions`` over HTTP (SSE);
- with --metering-cost, a second app, the same but ``usage_metering: false``: what metering costs;
- with --stream-interval-ms MS, a second app, the same but ``stream_interval_ms: MS`` (the model stage batches a
  stream's deltas): what the per-message cost of the hops is. ``--model-source tiny`` (a tiny random model with
  the default tokenizer) makes steps take a few ms, as on a GPU, so the hops' cost is what is measured;
- with --burst-gather-ms MS, a second app, the same but ``engine.burst_gather_ms: MS`` (an idle model replica
  waits for the rest of a burst before its first step): what that does to TTFT and tok/s;
- with --serve-defaults, a second app, the same but its replicas on Serve's default threading (SERVE_ENV_VARS
  back at Serve's defaults: user code and handle routers each on a thread of their own): what those cost.
Serve's proxy reaches the Router over gRPC, as `make serve` starts it (PROXY_ENV_VARS); one Ray has one proxy, so
what that saves is two runs: ``RAY_SERVE_PROXY_USE_GRPC=0 python -m ...`` measures Ray's object path instead.
Each Serve path also reports the CPU Serve's HTTP proxy and its Router and model replicas spent per output token
(from /proc through psutil; the model replica's includes the model), a figure far less noisy on a shared box than
tok/s.
--router-work measures what of the Router's CPU per token is its own Python work: ``OpenAIServing``'s streamed
completion (incremental detokenizing, the stop-string matcher, the chunk models) and the SSE encoding the Router's
HTTP route does, fed one-token deltas by an in-process backend that costs nothing (no Ray, no model), with and
without a stop string; and what a pass-through middleware around a streaming route costs per chunk, plain ASGI
(the Router's gate) against Starlette's ``@app.middleware("http")``; prints CPU microseconds per token (chunk).
--encryption-cost measures something else instead: what a model replica does to load an adapter version
(``AdapterCache.source`` + ``engine.add_lora``: read, decrypt when sealed, parse, cast) for one
r16 adapter on every projection of the default model, registered on a clear local root and on an encrypted
one, rounds interleaved; prints ms per load and the ratio; saves serve_load_encryption.json.
All stay up for the whole run and take turns: a warm-up round of the measured workload each, then --repeats
rounds (new prompts each round). Between rounds each in-process path hands back its OpenMP pool, so the
other's runs unthrottled (see engine/openmp.py). Prints each path's median TTFT, inter-token latency (ITL)
p50/p99 and output tokens/s (with its range), the ratios of the medians, and every failed request (non-200,
error event, exception); saves benchmarks/results/serve_load.{json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmaas.benchmarks.common import (
    RATIO_NOTE,
    RESULTS,
    add_repeats,
    failure,
    interleave,
    model_source,
    percentile,
    print_table,
    save,
    span,
    spread,
    stream_chunks,
    timed,
)

SERVE, ENGINE, BARE = "serve (HTTP, SSE)", "engine in-process", "bare engine"
UNMETERED = "serve, metering off"
METRICS = ["output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
CPU_METRICS = ["proxy_cpu_ms_per_tok", "router_cpu_ms_per_tok", "model_cpu_ms_per_tok"]


SERVE_DEFAULTS = "serve, Serve's default threading"


def batched(ms: float) -> str:
    return f"serve, stream_interval_ms {ms:g}"


def gathered(ms: float) -> str:
    return f"serve, burst_gather_ms {ms:g}"


def with_serve_defaults(config):
    """The app as build_app() wires it, its replicas on Serve's own default threading instead of SERVE_ENV_VARS."""
    from llmaas.deployments.builder import wire
    from llmaas.deployments.config import SERVE_ENV_VARS

    def plain(d):
        return d.options(ray_actor_options={**d.ray_actor_options,
                                            "runtime_env": {"env_vars": {k: "1" for k in SERVE_ENV_VARS}}})
    return wire(config, plain)


@dataclass
class Trace:
    start: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None  # why the request failed; None once it finished


def summarize(traces: list[Trace], wall: float) -> dict:
    """One round of one path. Latencies are of the requests that succeeded; every failure is listed."""
    ok = [t for t in traces if t.error is None]
    ttft = [t.token_times[0] - t.start for t in ok if t.token_times]
    itl = [b - a for t in ok for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(t.tokens for t in ok)
    return {"requests": len(traces), "failed": len(traces) - len(ok), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "ttft_p50_ms": percentile(ttft, 50) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99) * 1e3, "itl_p50_ms": percentile(itl, 50) * 1e3,
            "itl_p99_ms": percentile(itl, 99) * 1e3, "errors": [t.error for t in traces if t.error is not None]}


def path_row(name: str, rounds: list[dict]) -> dict:
    """A path's table row: medians over its rounds, the tok/s range, and all its rounds' failures."""
    cpu = {k: statistics.median(r[k] for r in rounds) for k in CPU_METRICS if k in rounds[0]}
    return {"path": name, "requests": sum(r["requests"] for r in rounds), "failed": sum(r["failed"] for r in rounds),
            **{k: statistics.median(r[k] for r in rounds) for k in METRICS}, **cpu,
            "tok_s_range": span([r["output_tok_s"] for r in rounds]),
            "spread": {k: spread([r[k] for r in rounds]) for k in METRICS}}


class ReplicaCPU:
    """CPU seconds Serve's HTTP proxy and the Router and LLMServer replicas of one Serve app spend, from now until
    ``per_token`` (the proxy is shared by the apps, which take turns: a round's proxy time is its path's)."""

    def __init__(self, app: str) -> None:
        import psutil

        tags = {"Proxy": "ray::ProxyActor", "Router": f"ServeReplica:{app}:Router",
                "LLMServer": f"ServeReplica:{app}:LLMServer"}
        self.procs = {role: [p for p in psutil.process_iter(["cmdline"])
                             if tag in " ".join(p.info["cmdline"] or [])] for role, tag in tags.items()}
        missing = [role for role, procs in self.procs.items() if not procs]
        assert not missing, f"no {missing} replica process of app {app!r} found"
        self.start = self._seconds()

    def _seconds(self) -> dict[int, float]:
        """CPU seconds so far of each replica process still alive."""
        import psutil

        seconds = {}
        for procs in self.procs.values():
            for p in procs:
                try:
                    seconds[p.pid] = sum(p.cpu_times()[:2])
                except psutil.NoSuchProcess:  # a replica replaced mid-round: counted up to its last reading
                    pass
        return seconds

    def per_token(self, tokens: int) -> dict[str, float]:
        end = self._seconds()
        per = {role: sum(end[p.pid] - self.start[p.pid] for p in procs if p.pid in end and p.pid in self.start)
               * 1e3 / max(tokens, 1) for role, procs in self.procs.items()}
        return {"proxy_cpu_ms_per_tok": per["Proxy"], "router_cpu_ms_per_tok": per["Router"],
                "model_cpu_ms_per_tok": per["LLMServer"]}


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


async def run_http(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[Trace]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    traces: list[Trace] = []

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> None:
        async with sem:
            trace = Trace(time.perf_counter())
            traces.append(trace)
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            try:
                async for chunk in stream_chunks(client, f"{url}/v1/completions", body):
                    if chunk.get("usage"):
                        trace.tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        trace.token_times.append(time.perf_counter())
            except Exception as exc:  # transport errors, failure answers, malformed events: counted, never dropped
                trace.error = failure(exc)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, p) for p in prompts))
    return traces


async def run_engine(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[Trace]:
    from llmaas.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    traces: list[Trace] = []

    async def one(i: int, prompt: list[int]) -> None:
        async with sem:
            trace = Trace(time.perf_counter())
            traces.append(trace)
            try:
                async for out in engine.generate(f"bench-{i}", prompt, params):
                    trace.token_times.append(time.perf_counter())
                    trace.tokens = out.num_output_tokens
            except Exception as exc:
                trace.error = failure(exc)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return traces


def run_bare(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[Trace]:
    """The engine stepped in this thread, ``concurrency`` requests in flight, a new one admitted as one ends."""
    from llmaas.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    todo = list(enumerate(prompts))[::-1]
    traces: dict[str, Trace] = {}
    while todo or engine.has_unfinished():
        while todo and engine.num_running + engine.num_waiting < concurrency:
            i, prompt = todo.pop()
            traces[f"bare-{i}"] = Trace(time.perf_counter())
            engine.add_request(f"bare-{i}", prompt, params)
        for out in engine.step():
            trace = traces[out.request_id]
            if out.error is not None:
                trace.error = failure(out.error)
            elif out.new_token_ids:
                trace.token_times.append(time.perf_counter())
                trace.tokens = out.num_output_tokens
    return list(traces.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-source", default="default",
                        help="'default' (SmolLM2), 'tiny' (a tiny random model with its tokenizer) or a checkpoint dir")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="in-flight requests (levels)")
    parser.add_argument("--requests", type=int, default=16, help="requests per round (at least the concurrency)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--metering-cost", action="store_true",
                        help="also serve an app with usage_metering off and report metering on / off")
    parser.add_argument("--encryption-cost", action="store_true",
                        help="instead: adapter load time on an encrypted root vs a clear one")
    parser.add_argument("--stream-interval-ms", type=float, default=None,
                        help="also serve an app with this stream_interval_ms and report it against the default")
    parser.add_argument("--burst-gather-ms", type=float, default=None,
                        help="also serve an app with this engine.burst_gather_ms and report it against the default")
    parser.add_argument("--serve-defaults", action="store_true",
                        help="also serve the app on Serve's default threading and report it against ours")
    parser.add_argument("--router-work", action="store_true",
                        help="instead: the Router's own CPU per streamed token (serving logic + SSE, no Ray)")
    parser.add_argument("--loads", type=int, default=10, help="adapter loads per round (--encryption-cost)")
    add_repeats(parser)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.encryption_cost:
        encryption_cost(args)
        return
    if args.router_work:
        router_work(args)
        return

    import ray
    import torch
    from ray import serve

    from llmaas.app.model_source import load_model, resolve_model
    from llmaas.deployments.builder import build_app
    from llmaas.deployments.config import PROXY_ENV_VARS, AppConfig
    from llmaas.engine import AsyncLLMEngine, LLMEngine, openmp

    top = max(args.concurrency)
    if args.model_source == "tiny":
        args.model_source = model_source(None, Path(tempfile.mkdtemp(prefix="llmaas-bench-")))
    app_args = {"model": {"source": args.model_source},
                "engine": {"torch_threads": args.torch_threads, "max_num_seqs": max(top, 8)}}
    config = AppConfig.model_validate(app_args)
    model = resolve_model(config.model)

    # The Serve path (proxy -> Router (tokenizes) -> LLMServer (streaming handle) -> SSE), and the same engine
    # config twice in this process (the async front and the bare engine each step their own); all stay loaded
    # so their rounds can alternate.
    apps = 1 + args.metering_cost + (args.stream_interval_ms is not None) + (args.burst_gather_ms is not None) \
        + args.serve_defaults
    for name, value in PROXY_ENV_VARS.items():  # Serve's proxy as `make serve` starts it, unless told otherwise
        os.environ.setdefault(name, value)
    ray.init(num_cpus=max(4, 1 + 2 * apps), include_dashboard=False, log_to_driver=False)  # each app asks for 1.2 CPUs
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    if args.metering_cost:  # its own storage root: the same engine config, no usage ledger
        serve.run(build_app({**app_args, "usage_metering": False, "storage_root": str(
            config.model.cache_dir / "bench-unmetered")}), name="bench-unmetered", route_prefix="/unmetered")
    if args.stream_interval_ms is not None:
        serve.run(build_app({**app_args, "stream_interval_ms": args.stream_interval_ms}), name="bench-batched",
                  route_prefix="/batched")
    if args.burst_gather_ms is not None:
        serve.run(build_app({**app_args, "engine": {**app_args["engine"], "burst_gather_ms": args.burst_gather_ms}}),
                  name="bench-gather", route_prefix="/gather")
    if args.serve_defaults:
        serve.run(with_serve_defaults(config), name="bench-defaults", route_prefix="/defaults")
    url = f"http://127.0.0.1:{args.port}"
    torch.set_num_threads(args.torch_threads)

    def new_engine() -> LLMEngine:
        return LLMEngine(load_model(model.path), model.engine_config(config.engine))
    bare = new_engine()
    vocab = bare.vocab_size
    engine = AsyncLLMEngine(new_engine())
    loop = asyncio.new_event_loop()  # one loop for every round: the engine's thread delivers to the first one

    def side(run: Callable[..., Awaitable[list[Trace]] | list[Trace]], concurrency: int,
             after: Callable[[], None], app: str | None = None) -> Callable[[int], dict]:
        def one_round(r: int) -> dict:
            # new prompts for every round and level: no prefix-cache reuse across them
            prompts = make_prompts(max(args.requests, concurrency), args.prompt_tokens, vocab,
                                   seed=concurrency * 1000 + r)
            cpu = ReplicaCPU(app) if app is not None else None
            t = time.perf_counter()
            traces = run(prompts, args.max_tokens, concurrency)
            if not isinstance(traces, list):
                traces = loop.run_until_complete(traces)
            wall = time.perf_counter() - t
            after()
            summary = summarize(traces, wall)
            if cpu is not None:
                summary |= cpu.per_token(summary["output_tokens"])
            return summary
        return one_round

    def engine_pool_back() -> None:
        loop.run_until_complete(engine.call(openmp.release_pool))

    runs: dict[int, dict[str, list[dict]]] = {}
    try:
        for c in args.concurrency:
            paths = {BARE: side(lambda *a: run_bare(bare, *a), c, openmp.release_pool),
                     ENGINE: side(lambda *a: run_engine(engine, *a), c, engine_pool_back),
                     SERVE: side(lambda *a: run_http(url, "base", *a), c, lambda: None, "bench")}
            if args.metering_cost:
                paths[UNMETERED] = side(lambda *a: run_http(f"{url}/unmetered", "base", *a), c, lambda: None,
                                        "bench-unmetered")
            if args.stream_interval_ms is not None:
                paths[batched(args.stream_interval_ms)] = side(lambda *a: run_http(f"{url}/batched", "base", *a), c,
                                                               lambda: None, "bench-batched")
            if args.burst_gather_ms is not None:
                paths[gathered(args.burst_gather_ms)] = side(lambda *a: run_http(f"{url}/gather", "base", *a), c,
                                                             lambda: None, "bench-gather")
            if args.serve_defaults:
                paths[SERVE_DEFAULTS] = side(lambda *a: run_http(f"{url}/defaults", "base", *a), c, lambda: None,
                                             "bench-defaults")
            runs[c] = interleave(paths, args.repeats)
    finally:
        engine.shutdown()
        loop.close()
        serve.shutdown()
        ray.shutdown()

    report(runs, args, model.served_name)


def encryption_cost(args) -> None:
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from llmaas.app.adapter_cache import AdapterCache
    from llmaas.app.model_source import base_model_info, load_model, resolve_model
    from llmaas.app.registry import Registry
    from llmaas.app.storage import open_storage
    from llmaas.app.storage.encrypted import MASTER_KEY_ENV, new_master_key
    from llmaas.deployments.config import AppConfig
    from llmaas.engine import LLMEngine
    from tests.models import make_peft_adapter

    torch.set_num_threads(args.torch_threads)
    config = AppConfig.model_validate({"model": {"source": args.model_source}})
    model = resolve_model(config.model)
    engine = LLMEngine(load_model(model.path), model.engine_config(config.engine))
    os.environ[MASTER_KEY_ENV] = new_master_key()
    with tempfile.TemporaryDirectory(prefix="llmaas-bench-enc-") as tmp:
        src = make_peft_adapter(AutoModelForCausalLM.from_pretrained(model.path), Path(tmp) / "a", seed=0, r=16)
        info = base_model_info(model.path, config.engine.max_lora_rank)
        sides = {}
        for name, encrypt in (("clear root", False), ("encrypted root", True)):
            registry = Registry(open_storage(str(Path(tmp) / name.replace(" ", "-")), encrypt=encrypt))
            version = registry.version("a", int(registry.register("a", src, info).split("@")[1]))
            cache = AdapterCache(registry.storage, Path(tmp) / f"cache-{encrypt}", 1 << 30)

            def load(r: int, cache=cache, version=version) -> None:
                for i in range(args.loads):
                    source = cache.source(version)
                    engine.add_lora("a@1", source if isinstance(source, dict) else str(source))
                    engine.remove_lora("a@1")
            sides[name] = timed(load, args.loads * 1000.0)  # loads per 1000 s: 1e6 / value = ms per load
        runs = interleave(sides, args.repeats)
    ms = {name: [1e6 / v for v in values] for name, values in runs.items()}
    rows = [{"path": name, "ms_per_load": statistics.median(v), "range": span(v)} for name, v in ms.items()]
    ratio = rows[1]["ms_per_load"] / rows[0]["ms_per_load"]
    print_table(rows, ["path", "ms_per_load", "range"])
    print(f"{args.loads} loads per round, medians of {args.repeats} interleaved rounds after a warm-up round; "
          f"encrypted / clear load time {ratio:.3f} ({RATIO_NOTE})")
    if not args.no_save:
        path = save("serve_load_encryption", {"args": vars(args), "model": model.served_name, "rows": rows,
                                              "encrypted_over_clear_ms": ratio, "runs_ms": ms})
        print(f"saved {path}")


def router_work(args) -> None:
    from transformers import AutoTokenizer

    from llmaas.app.catalog import ModelCatalog
    from llmaas.app.messages import TokenDelta, TokenizedPrompt
    from llmaas.app.model_source import resolve_model
    from llmaas.app.protocol import CompletionRequest
    from llmaas.app.serving import OpenAIServing, RequestLimits
    from llmaas.deployments.config import AppConfig
    from llmaas.deployments.router import _sse

    model = resolve_model(AppConfig.model_validate({"model": {"source": args.model_source}}).model)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    n = args.max_tokens
    token_ids = make_prompts(1, n, tokenizer.vocab_size, seed=1)[0]

    class InstantBackend:
        """The model stage's deltas, one token each, as fast as they are asked for."""

        async def encode_prompt(self, prompt: list[int], max_tokens: int | None) -> TokenizedPrompt:
            return TokenizedPrompt(list(prompt), max_tokens or n)

        async def generate(self, request):
            for i, t in enumerate(token_ids):
                yield TokenDelta([t], "length" if i == n - 1 else None, len(request.prompt_token_ids), i + 1, None)

    serving = OpenAIServing(InstantBackend(), tokenizer, ModelCatalog(model.served_name, model.max_model_len),
                            RequestLimits())

    def side(stop: list[str] | None) -> Callable[[int], float]:
        async def stream() -> int:
            req = CompletionRequest(model=model.served_name, prompt=make_prompts(1, args.prompt_tokens, 1000)[0],
                                    max_tokens=n, stream=True, stop=stop, stream_options={"include_usage": True})
            events = 0
            async for _ in _sse(serving.completion_stream(req, await serving.prepare_completion(req))).body_iterator:
                events += 1
            return events

        def one_round(r: int) -> float:
            t = time.process_time()
            events = asyncio.run(stream())
            assert events >= n, events  # every token made an event (and the usage chunk and [DONE] came)
            return (time.process_time() - t) / n * 1e6
        return one_round

    runs = interleave({"no stop strings": side(None), "one stop string": side(["\u2603 never"]),
                       **middleware_sides(n)}, args.repeats)
    rows = [{"case": name, "cpu_us_per_token": statistics.median(v), "range": span(v)} for name, v in runs.items()]
    print_table(rows, ["case", "cpu_us_per_token", "range"])
    print(f"{n} one-token deltas per stream; medians of {args.repeats} interleaved rounds after a warm-up round; "
          "compare with router_cpu_ms_per_tok of a Serve run: the rest of the Router's CPU is Ray's streaming and ASGI")
    if not args.no_save:
        path = save("serve_load_router_work", {"args": vars(args), "model": model.served_name, "rows": rows,
                                               "runs_us": runs})
        print(f"saved {path}")


def middleware_sides(n: int) -> dict[str, Callable[[int], float]]:
    """CPU per streamed chunk a pass-through middleware adds, of the two kinds the Router's gate could be: plain
    ASGI (what it is) and Starlette's ``@app.middleware("http")`` (what it was), each around a FastAPI route that
    streams ``n`` chunks, driven in process; the rows are the whole route's cost per chunk."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.datastructures import MutableHeaders

    def app_with(kind: str) -> FastAPI:
        app = FastAPI()

        @app.get("/stream")
        async def stream():
            async def body():
                for i in range(n):
                    yield f'data: {{"i": {i}}}\n\n'
            return StreamingResponse(body(), media_type="text/event-stream")

        if kind == "starlette":
            @app.middleware("http")
            async def gate(request: Request, call_next):
                response = await call_next(request)
                response.headers["x-gate"] = "1"
                return response
        else:
            class Gate:
                def __init__(self, inner) -> None:
                    self.inner = inner

                async def __call__(self, scope, receive, send) -> None:
                    async def send_marked(message) -> None:
                        if message["type"] == "http.response.start":
                            MutableHeaders(scope=message)["x-gate"] = "1"
                        await send(message)
                    await self.inner(scope, receive, send_marked)
            app.add_middleware(Gate)
        return app

    def side(kind: str) -> Callable[[int], float]:
        app = app_with(kind)

        async def drive() -> int:
            scope = {"type": "http", "method": "GET", "path": "/stream", "raw_path": b"/stream", "query_string": b"",
                     "headers": [], "http_version": "1.1", "scheme": "http", "server": ("bench", 80),
                     "client": ("bench", 1), "root_path": ""}
            sent = 0

            async def receive():
                await asyncio.Event().wait()  # the client never sends more (nor leaves)

            async def send(message) -> None:
                nonlocal sent
                sent += message["type"] == "http.response.body" and bool(message.get("body"))

            await app(scope, receive, send)
            return sent

        def one_round(r: int) -> float:
            t = time.process_time()
            sent = asyncio.run(drive())
            assert sent == n, sent
            return (time.process_time() - t) / n * 1e6
        return one_round

    return {"route + plain ASGI middleware": side("plain"), "route + @app.middleware('http')": side("starlette")}


def report(runs: dict[int, dict[str, list[dict]]], args, model_name: str) -> None:
    """Prints each path's medians per concurrency, the ratios of the medians and every failure; saves JSON + PNG."""
    rows, ratios = [], {}
    for c, paths in runs.items():
        level = {name: path_row(name, rounds) | {"concurrency": c} for name, rounds in paths.items()}
        rows += level.values()
        serve_, engine_, bare_ = level[SERVE], level[ENGINE], level[BARE]
        ratios[c] = {"engine_over_bare_tok_s": engine_["output_tok_s"] / bare_["output_tok_s"],
                     "serve_over_bare_tok_s": serve_["output_tok_s"] / bare_["output_tok_s"],
                     "serve_over_engine_tok_s": serve_["output_tok_s"] / engine_["output_tok_s"],
                     "serve_minus_engine_ttft_p50_ms": serve_["ttft_p50_ms"] - engine_["ttft_p50_ms"]}
        if UNMETERED in level:
            ratios[c]["metering_on_over_off_tok_s"] = serve_["output_tok_s"] / level[UNMETERED]["output_tok_s"]
        if args.stream_interval_ms is not None:
            other = level[batched(args.stream_interval_ms)]
            ratios[c]["batched_over_engine_tok_s"] = other["output_tok_s"] / engine_["output_tok_s"]
            ratios[c]["batched_minus_engine_ttft_p50_ms"] = other["ttft_p50_ms"] - engine_["ttft_p50_ms"]
        if args.burst_gather_ms is not None:
            other = level[gathered(args.burst_gather_ms)]
            ratios[c]["gathered_over_engine_tok_s"] = other["output_tok_s"] / engine_["output_tok_s"]
            ratios[c]["gathered_minus_engine_ttft_p50_ms"] = other["ttft_p50_ms"] - engine_["ttft_p50_ms"]
        if args.serve_defaults:
            plain = level[SERVE_DEFAULTS]
            ratios[c]["ours_over_serve_defaults_tok_s"] = serve_["output_tok_s"] / plain["output_tok_s"]
            ratios[c]["ours_over_serve_defaults_router_cpu"] = (serve_["router_cpu_ms_per_tok"]
                                                                / plain["router_cpu_ms_per_tok"])
            ratios[c]["ours_over_serve_defaults_model_cpu"] = (serve_["model_cpu_ms_per_tok"]
                                                               / plain["model_cpu_ms_per_tok"])
    errors = collections.Counter(e for paths in runs.values() for rounds in paths.values() for r in rounds
                                 for e in r["errors"])
    print_table(rows, ["concurrency", "path", "requests", "failed", "output_tok_s", "tok_s_range", "ttft_p50_ms",
                       "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", *CPU_METRICS])
    print(f"medians of {args.repeats} interleaved rounds after a warm-up round; {RATIO_NOTE}")
    for c, ratio in ratios.items():
        print(f"concurrency {c}: in-process / bare {ratio['engine_over_bare_tok_s']:.3f}  "
              f"serve / bare {ratio['serve_over_bare_tok_s']:.3f}  "
              f"serve / in-process {ratio['serve_over_engine_tok_s']:.3f}  "
              f"TTFT p50 serve - in-process {ratio['serve_minus_engine_ttft_p50_ms']:+.1f} ms" +
              (f"  metering on / off {ratio['metering_on_over_off_tok_s']:.3f}"
               if "metering_on_over_off_tok_s" in ratio else "") +
              (f"  batched serve / in-process {ratio['batched_over_engine_tok_s']:.3f}, TTFT p50 "
               f"{ratio['batched_minus_engine_ttft_p50_ms']:+.1f} ms" if "batched_over_engine_tok_s" in ratio else "") +
              (f"  gathered serve / in-process {ratio['gathered_over_engine_tok_s']:.3f}, TTFT p50 "
               f"{ratio['gathered_minus_engine_ttft_p50_ms']:+.1f} ms" if "gathered_over_engine_tok_s" in ratio
               else "") +
              (f"  ours / Serve's default threading: tok/s {ratio['ours_over_serve_defaults_tok_s']:.3f}, Router CPU "
               f"per token {ratio['ours_over_serve_defaults_router_cpu']:.3f}, model replica CPU per token "
               f"{ratio['ours_over_serve_defaults_model_cpu']:.3f}" if "ours_over_serve_defaults_tok_s" in ratio
               else ""))
    print("failures:", dict(errors) or "none")
    if not args.no_save:
        name = "serve_load_metering" if args.metering_cost else \
            "serve_load_stream_interval" if args.stream_interval_ms is not None else \
            "serve_load_burst_gather" if args.burst_gather_ms is not None else \
            "serve_load_serve_defaults" if args.serve_defaults else "serve_load"
        path = save(name, {"args": vars(args), "model": model_name, "rows": rows, "ratios": ratios,
                           "errors": dict(errors), "rounds": runs})
        plot(rows, RESULTS / f"{name}.png")
        print(f"saved {path}")


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    levels = list(dict.fromkeys(r["concurrency"] for r in rows))
    width = 0.8 / len(paths)
    for ax, (key, label) in zip(axes, [("output_tok_s", "output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                                       ("itl_p50_ms", "ITL p50 (ms)")]):
        for k, name in enumerate(paths):
            values = [next(r[key] for r in rows if r["path"] == name and r["concurrency"] == c) for c in levels]
            ax.bar([i + k * width for i in range(len(levels))], values, width, label=name)
        ax.set_xticks([i + width * (len(paths) - 1) / 2 for i in range(len(levels))],
                      [f"concurrency {c}" for c in levels])
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
