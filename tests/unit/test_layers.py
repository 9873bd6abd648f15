"""The rooms import one way (engine <- app <- training <- deployments), as pyproject's import-linter contracts say."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def loaded_after_import(modules: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules`` (comma-separated)."""
    code = f"import sys, {modules}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_the_per_root_actors_and_the_router_start_without_what_they_never_run():
    """Every app start (and every Router replica an autoscaler adds) imports these modules in a fresh process:
    the registry, usage and access actors used to import torch (~1.5 s on 2 cores) for a type and an adapter
    check, and the Router Ray Train + peft (~3 s) for the job runner's handle; an app deploy took ~15 CPU-s more."""
    actors = ", ".join(f"llmaas.deployments.{m}" for m in ("registry_service", "usage_service", "access_service"))
    assert loaded_after_import(actors, ("torch",)) == []
    assert loaded_after_import("llmaas.deployments.router", ("peft", "ray.train", "llmaas.training.jobs")) == []
