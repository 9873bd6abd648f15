"""`make serve` exactly as a user runs it, then the README's fine-tuning loop through the official client.

`serve run serve_config.yaml` in its own process starts its own Ray with the machine's real CPU count
(no inflated num_cpus), the serving graph takes its CPUs, and the README's Python snippet (executed as
written; only the URL points at this server's port) must see its job succeed and the adapter answer.
The copy of serve_config.yaml differs in two keys only: the HTTP port (a user's `make serve` may be on
8000) and storage_root (a temp dir, not the user's ~/.cache/llmaas/storage).

This directory sorts before integration/, so it runs before the session's shared Ray instance exists.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.serve_process import serve_run
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8000"


def readme_python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory, default_model_dir):  # default_model_dir: what `llmaas prepare` does first
    import ray

    if ray.is_initialized():
        pytest.fail("run tests/e2e before anything starts a Ray instance in this process")
    tmp = tmp_path_factory.mktemp("make-serve")
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["storage_root"] = str(tmp / "storage")
    url = f"http://127.0.0.1:{port}"
    with serve_run(config, tmp, url):
        yield url, tmp


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmaas.deployments.cli", "adapters", "--url", url, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(1200)  # serve start + a real fine-tuning job of the default model: ~5 min on 2 cores
def test_readme_finetuning_loop_finishes_on_make_serve(make_serve, capsys):
    import openai

    url, tmp = make_serve
    # The serving graph holds its CPUs: a job must fit beside it on this machine, whatever its core count.
    code = readme_python_block("### Fine-tune, serve the new adapter").replace(README_URL, url)
    assert code.count(url) == 1, "the README snippet should name the server once"
    started = time.monotonic()
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # the snippet's paths are relative to a checkout, as a user runs it
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README, as written
    finally:
        os.chdir(cwd)
    elapsed = time.monotonic() - started
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nREADME fine-tuning loop on make serve ({os.cpu_count()} CPUs): {elapsed:.0f} s")
    job, client = namespace["job"], namespace["client"]
    assert job.status == "succeeded", (job.error, printed)
    assert job.fine_tuned_model == "sentiment@1"
    assert "waiting for resources" not in printed  # it fit at once beside serving
    assert "2 worker(s) x CPU" in printed and "fits the" in printed, printed  # auto: shares of what is free
    version, alias = namespace["version"], namespace["alias"]
    assert version.model == "sentiment@1" and alias.model == "sentiment@1"  # eval passed: promoted
    assert version.choices[0].message.content.strip() == "negative"  # the adapter's answer, not the base's
    assert alias.choices[0].message.content == version.choices[0].message.content

    # Roll back: a second version of the same adapter is promoted, then the alias goes back to @1.
    adapters = httpx.get(f"{url}/v1/adapters", timeout=30).json()["adapters"]
    path = Path(tmp / "storage" / adapters["sentiment"]["versions"]["1"]["path"])
    assert cli(url, "register", "sentiment", str(path), "--promote").returncode == 0
    review = namespace["review"]
    assert client.chat.completions.create(model="sentiment", messages=review, max_tokens=4).model == "sentiment@2"
    done = cli(url, "rollback", "sentiment")
    assert done.returncode == 0, done.stderr
    back = client.chat.completions.create(model="sentiment", messages=review, max_tokens=4, temperature=0)
    assert back.model == "sentiment@1" and back.choices[0].message.content == version.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="sentiment@3", messages=review, max_tokens=4)
