"""Serve overhead: N concurrent streaming clients over HTTP vs the same workload on the engine in-process.

    python -m llmaas.benchmarks.serve_load --concurrency 8 --requests 32 --prompt-tokens 128 --max-tokens 64

Prints TTFT, inter-token latency (ITL) p50/p99 and output tokens/s for both paths and
their ratio; saves benchmarks/results/serve_load.{json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from llmaas.benchmarks.common import RESULTS, percentile, print_table, save


@dataclass
class Trace:
    start: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0


def summarize(name: str, traces: list[Trace], wall: float) -> dict:
    ttft = [t.token_times[0] - t.start for t in traces if t.token_times]
    itl = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(t.tokens for t in traces)
    return {"path": name, "requests": len(traces), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "ttft_p50_ms": percentile(ttft, 50) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99) * 1e3, "itl_p50_ms": percentile(itl, 50) * 1e3,
            "itl_p99_ms": percentile(itl, 99) * 1e3}


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
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        trace.tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        trace.token_times.append(time.perf_counter())
            traces.append(trace)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, p) for p in prompts))
    return traces


async def run_engine(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[Trace]:
    from llmaas.deployments.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    traces: list[Trace] = []

    async def one(i: int, prompt: list[int]) -> None:
        async with sem:
            trace = Trace(time.perf_counter())
            async for out in engine.generate(f"bench-{i}", prompt, params):
                trace.token_times.append(time.perf_counter())
                trace.tokens = out.num_output_tokens
            traces.append(trace)

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
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from llmaas.app.builder import build_app
    from llmaas.app.config import AppConfig
    from llmaas.app.model_source import load_model, resolve_model
    from llmaas.deployments.engine import AsyncLLMEngine, LLMEngine

    app_args = {"model": {"source": args.model_source},
                "engine": {"torch_threads": args.torch_threads, "max_num_seqs": max(args.concurrency, 8)}}
    config = AppConfig.model_validate(app_args)
    model = resolve_model(config.model)
    prompts = make_prompts(args.requests, args.prompt_tokens, load_model(model.path).config.vocab_size)

    # 1. The Serve path: proxy -> Router -> Tokenizer -> LLMServer (streaming handle) -> SSE.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    asyncio.run(run_http(url, "base", prompts[:2], 4, 2))  # warm-up
    t0 = time.perf_counter()
    http_traces = asyncio.run(run_http(url, "base", prompts, args.max_tokens, args.concurrency))
    serve_row = summarize("serve (HTTP, SSE)", http_traces, time.perf_counter() - t0)
    serve.shutdown()
    ray.shutdown()

    # 2. The same workload on the engine in this process.
    torch.set_num_threads(args.torch_threads)
    engine = AsyncLLMEngine(LLMEngine(load_model(model.path),
                                      config.engine.to_engine_config(model.max_model_len, model.eos_token_ids)))

    async def engine_run():
        await run_engine(engine, prompts[:2], 4, 2)
        t = time.perf_counter()
        traces = await run_engine(engine, prompts, args.max_tokens, args.concurrency)
        return traces, time.perf_counter() - t

    traces, wall = asyncio.run(engine_run())
    engine.shutdown()
    engine_row = summarize("engine in-process", traces, wall)

    rows = [serve_row, engine_row]
    ratio = {"throughput_serve_over_engine": serve_row["output_tok_s"] / engine_row["output_tok_s"],
             "ttft_p50_serve_over_engine": serve_row["ttft_p50_ms"] / engine_row["ttft_p50_ms"]}
    print_table(rows, ["path", "requests", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"])
    print(f"serve / in-process throughput: {ratio['throughput_serve_over_engine']:.3f}  "
          f"TTFT p50 ratio: {ratio['ttft_p50_serve_over_engine']:.3f}")
    path = save("serve_load", {"args": vars(args), "model": model.served_name, "rows": rows, "ratio": ratio})
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
