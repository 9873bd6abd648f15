"""`serve run <config>` in its own process (and its own Ray), as a user starts it; stopped with Ctrl-C."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from llmaas.deployments.config import PROXY_ENV_VARS

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve_run(config: dict, tmp: Path, url: str, verify: bool | str = True, timeout_s: float = 600) -> Iterator[None]:
    """Runs ``serve run`` on ``config`` (written to ``tmp``) until ``url``/v1/models answers 200; stops it after."""
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **PROXY_ENV_VARS}  # as `make serve`
    log = (tmp / "serve.log").open("w")
    serve_bin = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen([str(serve_bin), "run", str(tmp / "serve_config.yaml")], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"serve run exited: {(tmp / 'serve.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=5, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not up after {timeout_s} s: {(tmp / 'serve.log').read_text()[-3000:]}"
            time.sleep(0.25)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it: Serve and the Ray it started go down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:  # its process group only: never a Ray the user runs beside the tests
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
