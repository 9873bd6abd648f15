"""Shared benchmark helpers: percentiles, result files (JSON + PNG) that carry the command line."""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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

    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def save(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python -m llmaas.benchmarks." + name + " " + shlex.join(sys.argv[1:]),
               "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


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
