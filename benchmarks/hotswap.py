"""Hot-swap under steady load: time from an alias move to the first token from the new version.

    python -m llmaas.benchmarks.hotswap --clients 4 --moves 6 --window 4

Serves the default model with two LoRA adapter versions (random PEFT adapters, r=8,
all projections) of one name, keeps N streaming clients busy on the alias, moves the
alias back and forth, and reports p50/p99 of move -> first token of the new version
(it includes a whole request's TTFT, printed beside it for comparison),
throughput during the swaps vs before them, and failed requests (must be 0).
Saves benchmarks/results/hotswap.{json,png}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass

from llmaas.benchmarks.common import RESULTS, percentile, print_table, save


@dataclass
class Req:
    start: float
    model: str = ""
    first_token: float | None = None
    tokens: int = 0
    ok: bool = False
    end: float = 0.0


async def client_loop(url: str, stop_at: float, log: list[Req], max_tokens: int) -> None:
    import httpx

    body = {"model": "hs", "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() < stop_at:
            req = Req(time.perf_counter())
            log.append(req)
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            break
                        req.model = chunk["model"]
                        if chunk.get("usage"):
                            req.tokens = chunk["usage"]["completion_tokens"]
                            req.ok = True
                        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and \
                                req.first_token is None:
                            req.first_token = time.perf_counter()
            except Exception:
                req.ok = False
            req.end = time.perf_counter()


async def run(url: str, args) -> tuple[list[Req], list[tuple[float, str]], float]:
    import httpx

    log: list[Req] = []
    moves: list[tuple[float, str]] = []
    start = time.perf_counter()
    total = args.window * (args.moves + 1)
    clients = [asyncio.create_task(client_loop(url, start + total, log, args.max_tokens))
               for _ in range(args.clients)]
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(args.moves):
            await asyncio.sleep(args.window)
            target = 2 if i % 2 == 0 else 1
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/adapters/hs/promote", json={"version": target})
            r.raise_for_status()
            moves.append((t, f"hs@{target}"))
    await asyncio.gather(*clients)
    return log, moves, start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--moves", type=int, default=6)
    p.add_argument("--window", type=float, default=8.0, help="seconds between alias moves")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--port", type=int, default=8766)
    args = p.parse_args()

    import httpx
    import ray
    from ray import serve
    from transformers import AutoModelForCausalLM

    from llmaas.app.builder import build_app
    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import resolve_model
    from tests.models import make_peft_adapter

    storage = tempfile.mkdtemp(prefix="llmaas-hotswap-")
    base_path = resolve_model(ModelSettings()).path
    base = AutoModelForCausalLM.from_pretrained(base_path)
    adapters = [make_peft_adapter(base, f"{storage}/src{i}", seed=i, b_std=0.05) for i in range(2)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app({"engine": {"torch_threads": 2}, "storage_root": storage}), name="hotswap",
              route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    for i, path in enumerate(adapters):
        httpx.post(f"{url}/v1/adapters", json={"name": "hs", "path": path, "promote": i == 0},
                   timeout=60).raise_for_status()
    log, moves, start = asyncio.run(run(url, args))
    serve.shutdown()
    ray.shutdown()

    delays = []
    for t, version in moves:
        firsts = [r.first_token for r in log if r.model == version and r.start >= t and r.first_token]
        if firsts:
            delays.append(min(firsts) - t)
    done = [r for r in log if r.ok]
    failed = [r for r in log if not r.ok and r.start < start + args.window * (args.moves + 1) - 1]

    def tok_s(t0: float, t1: float) -> float:
        """Tokens of the requests that finished in [t0, t1), per second."""
        return sum(r.tokens for r in done if t0 <= r.end < t1) / (t1 - t0)

    before = tok_s(start, moves[0][0])
    during = [tok_s(t, t + args.window) for t, _ in moves]
    ttft = [r.first_token - r.start for r in done if r.first_token]
    row = {"moves": len(moves), "move_to_new_version_p50_ms": percentile(delays, 50) * 1e3,
           "move_to_new_version_p99_ms": percentile(delays, 99) * 1e3,
           "ttft_p50_ms_all_requests": percentile(ttft, 50) * 1e3, "tok_s_before": before,
           "tok_s_during_swaps": sum(during) / len(during), "ratio": (sum(during) / len(during)) / before,
           "requests": len(log), "failed": len(failed)}
    print_table([row], list(row))
    path = save("hotswap", {"args": vars(args), "row": row, "delays_s": delays})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    for version, color in (("hs@1", "tab:blue"), ("hs@2", "tab:orange")):
        pts = [(r.first_token - start, 1 if version == "hs@1" else 2) for r in done if r.model == version]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=6, color=color, label=version)
    for t, _ in moves:
        ax.axvline(t - start, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("seconds (dashed: alias moves)")
    ax.set_yticks([1, 2], ["hs@1", "hs@2"])
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(RESULTS / "hotswap.png", dpi=100)
    print("saved", path)


if __name__ == "__main__":
    main()
