"""LoRA fine-tuning on Ray Train: config, data, recipe (per worker), evaluation, jobs, CLI."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EvalSettings", "FineTuneJob", "JobHandle", "LoRASettings", "run_job", "submit"]
_HOME = {"EvalSettings": "config", "FineTuneJob": "config", "LoRASettings": "config", "JobHandle": "jobs",
         "run_job": "jobs", "submit": "jobs"}


def __getattr__(name: str) -> Any:
    """The Python API (``from llmaas.training import FineTuneJob, submit``), loaded on first use: importing any
    module of this package (the `llmaas` CLI imports its argument parser) must not pull in Ray Train."""
    if name in _HOME:
        return getattr(importlib.import_module(f"llmaas.training.{_HOME[name]}"), name)
    raise AttributeError(f"module 'llmaas.training' has no attribute {name!r}")
