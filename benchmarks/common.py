"""Shared benchmark helpers: interleaved repetitions, median and spread, percentiles, result files (JSON + PNG)
that carry the command which made them."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")
RATIO_NOTE = "ratio: median / median"


def add_repeats(parser: argparse.ArgumentParser, default: int = 3) -> None:
    parser.add_argument("--repeats", type=int, default=default,
                        help="measured rounds per side, interleaved, after one warm-up round")


def interleave(sides: dict[str, Callable[[int], T]], repeats: int) -> dict[str, list[T]]:
    """Runs round r of every side, then round r + 1 of every side, ...: background load that drifts during a run
    then falls on every side alike (measuring one side, then the next, once swung a ratio from 1.13x to 0.94x).
    The side that goes first rotates each round. Round 0 is a warm-up at the measured shape and is dropped;
    rounds 1..repeats are returned. ``side(r)`` gets the round, e.g. to vary prompts so no cache carries over.
    """
    names = list(sides)
    runs: dict[str, list[T]] = {name: [] for name in names}
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            value = sides[name](r)
            if r:
                runs[name].append(value)
    return runs


def timed(fn: Callable[[int], Any], work: float, sync: Callable[[], None] = lambda: None) -> Callable[[int], float]:
    """A side for interleave(): runs ``fn(r)`` and returns ``work`` (e.g. tokens) per second of its wall time;
    ``sync()`` runs before each clock read (e.g. torch.cuda.synchronize)."""
    def side(r: int) -> float:
        sync()
        t = time.perf_counter()
        fn(r)
        sync()
        return work / (time.perf_counter() - t)
    return side


def shift(prompt: list[int], r: int, vocab: int) -> list[int]:
    """A different prompt of the same length for round r: no prefix-cache or KV reuse between rounds."""
    return [(t + 13 * r) % (vocab - 1) + 1 for t in prompt]


def spread(values: list[float]) -> dict[str, Any]:
    """A repeated measurement as results record it: the median, the range, every run."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def span(values: list[float]) -> str:
    """'min-max' of repeated runs, for a table column."""
    return f"{min(values):.1f}-{max(values):.1f}"


def versus(case: str, ours: list[float], peer: str, theirs: list[float]) -> dict[str, Any]:
    """A table row: our runs vs a peer's over the same interleaved rounds; the ratio is of the medians."""
    mine, other = spread(ours), spread(theirs)
    return {"case": case, "ours_tok_s": mine["median"], "ours_range": span(ours), "peer": peer,
            "peer_tok_s": other["median"], "peer_range": span(theirs), "ratio": mine["median"] / other["median"],
            "ours_spread": mine, "peer_spread": other}


class RequestFailed(Exception):
    """The server answered a request with a failure: a non-200 status, an error event, a stream cut short."""


async def stream_chunks(http, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POSTs a streaming (SSE) request with an ``httpx.AsyncClient`` and yields its JSON chunks; raises
    RequestFailed on a non-200 status, an error event, or a stream that ends before ``[DONE]``."""
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RequestFailed(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RequestFailed(f"error event: {chunk['error']}")
                yield chunk
    raise RequestFailed("the stream ended before [DONE]")


def failure(exc: BaseException) -> str:
    """How a failed request is recorded: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}"


def print_versus(rows: list[dict[str, Any]], repeats: int) -> None:
    print_table(rows, ["case", "ours_tok_s", "ours_range", "peer", "peer_tok_s", "peer_range", "ratio"])
    print(f"tok/s: median of {repeats} interleaved rounds after a warm-up round (range: min-max); {RATIO_NOTE}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import os

    name = platform.processor() or platform.machine()
    try:  # the CPU model, not just the ISA: the same flags run bf16 at 4x fp32 on one CPU and 0.56x on another
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} x{os.cpu_count()}"


def save(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": command(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def command() -> str:
    """The command line that ran this benchmark, as it can be run again."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    how = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join(["python", *how, *sys.argv[1:]])


def model_source(given: str | None, work: Path) -> str:
    """The model a serving benchmark runs: ``given``, else a tiny random chat model with the default model's
    tokenizer (built under ``work``), so the benchmark measures the serving path rather than the model."""
    if given is not None:
        return given
    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import default_model_dir
    from tests.models import save_tiny_chat_model

    return str(save_tiny_chat_model(work / "tiny", default_model_dir(ModelSettings().cache_dir)))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
