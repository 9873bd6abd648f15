"""Serve overhead: N concurrent streaming clients over HTTP vs the same workload on the engine in-process.

    python -m llmaas.benchmarks.serve_load --concurrency 8 --requests 32 --prompt-tokens 128 --max-tokens 64

Both paths stay up for the whole run and take turns: a warm-up round of the measured
workload each, then --repeats rounds (new prompts each round). Prints each path's median
TTFT, inter-token latency (ITL) p50/p99 and output tokens/s (with its range), the ratio of
the medians, and every failed request (non-200, error event, exception); saves
benchmarks/results/serve_load.{json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from llmaas.benchmarks.common import (
    RATIO_NOTE,
    RESULTS,
    add_repeats,
    failure,
    interleave,
    percentile,
    print_table,
    save,
    span,
    spread,
    stream_chunks,
)

SERVE, ENGINE = "serve (HTTP, SSE)", "engine in-process"
METRICS = ["output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]


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
    return {"path": name, "requests": sum(r["requests"] for r in rounds), "failed": sum(r["failed"] for r in rounds),
            **{k: statistics.median(r[k] for r in rounds) for k in METRICS},
            "tok_s_range": span([r["output_tok_s"] for r in rounds]),
            "spread": {k: spread([r[k] for r in rounds]) for k in METRICS}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-source", default="default", help="'default' (SmolLM2) or a checkpoint dir")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    add_repeats(parser)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from llmaas.app.model_source import load_model, resolve_model
    from llmaas.deployments.builder import build_app
    from llmaas.deployments.config import AppConfig
    from llmaas.engine import AsyncLLMEngine, LLMEngine

    app_args = {"model": {"source": args.model_source},
                "engine": {"torch_threads": args.torch_threads, "max_num_seqs": max(args.concurrency, 8)}}
    config = AppConfig.model_validate(app_args)
    model = resolve_model(config.model)
    hf_model = load_model(model.path)
    vocab = hf_model.config.vocab_size

    # The Serve path (proxy -> Router -> Tokenizer -> LLMServer (streaming handle) -> SSE), and the same engine
    # config in this process; both stay loaded so their rounds can alternate.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    torch.set_num_threads(args.torch_threads)
    engine = AsyncLLMEngine(LLMEngine(hf_model, config.engine.to_engine_config(model.max_model_len,
                                                                              model.eos_token_ids)))
    loop = asyncio.new_event_loop()  # one loop for every round: the engine's thread delivers to the first one

    def side(run: Callable[..., Awaitable[list[Trace]]]) -> Callable[[int], dict]:
        def one_round(r: int) -> dict:
            prompts = make_prompts(args.requests, args.prompt_tokens, vocab, seed=r)  # no prefix-cache reuse
            t = time.perf_counter()
            traces = loop.run_until_complete(run(prompts, args.max_tokens, args.concurrency))
            return summarize(traces, time.perf_counter() - t)
        return one_round

    try:
        runs = interleave({SERVE: side(lambda *a: run_http(url, "base", *a)),
                           ENGINE: side(lambda *a: run_engine(engine, *a))}, args.repeats)
    finally:
        engine.shutdown()
        loop.close()
        serve.shutdown()
        ray.shutdown()

    report(runs, args, model.served_name)


def report(runs: dict[str, list[dict]], args, model_name: str) -> None:
    """Prints each path's medians, the ratios of the medians and every failure; saves JSON + PNG."""
    rows = [path_row(name, rounds) for name, rounds in runs.items()]
    serve_row, engine_row = rows
    ratio = {"throughput_serve_over_engine": serve_row["output_tok_s"] / engine_row["output_tok_s"],
             "ttft_p50_serve_over_engine": serve_row["ttft_p50_ms"] / engine_row["ttft_p50_ms"]}
    errors = collections.Counter(e for rounds in runs.values() for r in rounds for e in r["errors"])
    print_table(rows, ["path", "requests", "failed", "output_tok_s", "tok_s_range", "ttft_p50_ms", "ttft_p99_ms",
                       "itl_p50_ms", "itl_p99_ms"])
    print(f"medians of {args.repeats} interleaved rounds after a warm-up round; {RATIO_NOTE}")
    print(f"serve / in-process throughput: {ratio['throughput_serve_over_engine']:.3f}  "
          f"TTFT p50 ratio: {ratio['ttft_p50_serve_over_engine']:.3f}")
    print("failures:", dict(errors) or "none")
    if not args.no_save:
        path = save("serve_load", {"args": vars(args), "model": model_name, "rows": rows, "ratio": ratio,
                                   "errors": dict(errors), "rounds": runs})
        plot(rows, RESULTS / "serve_load.png")
        print(f"saved {path}")

def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    names = [r["path"] for r in rows]
    for ax, (key, label) in zip(axes, [("output_tok_s", "output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                                       ("itl_p50_ms", "ITL p50 (ms)")]):
        ax.bar(names, [r[key] for r in rows], color=["tab:blue", "tab:gray"])
        ax.set_title(label)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
