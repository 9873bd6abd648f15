"""One Ray instance and one Serve app per test session: the real graph, real HTTP, a tiny chat model."""
from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import make_bucket

APP = "llmaas"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(probe: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Polls ``probe`` until it returns something truthy (returned) or ``timeout`` passes (its last value)."""
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def live_train_actors() -> dict[str, str]:
    """Ray Train controllers and workers alive in the cluster, id -> class (read from the GCS actor table: the
    state API needs the dashboard, which the test cluster does not run). Compare with a snapshot taken before a
    job: a job run inline in this process leaves its idle controller referenced by Train's SIGINT handler."""
    import ray

    return {actor_id: a["ActorClassName"] for actor_id, a in ray._private.state.actors().items()
            if a["State"] != "DEAD" and a["ActorClassName"] in ("TrainController", "RayTrainWorker")}


def engine_stats(app: str, replicas: int = 1, tries: int = 20) -> dict[str, dict]:
    """Engine stats of each LLMServer replica of ``app``, by replica id (a handle call lands on a random one)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        # calls in flight together: Serve's router sends the next one to the less busy replica, so all are reached
        for stats in [r.result() for r in [handle.stats.remote() for _ in range(4 * replicas)]]:
            seen[stats["replica"]] = stats
        if len(seen) >= replicas:
            break
    return seen


def assert_aborted_and_freed(app: str, before: dict[str, dict], aborted: int, within: float) -> None:
    """Within ``within`` seconds every replica of ``app`` is idle with all KV blocks free, and the engines
    aborted exactly ``aborted`` requests since ``before`` (an engine_stats snapshot): a request that ran to its
    end instead of being aborted fails this, whatever the window."""
    def idle() -> dict[str, dict] | None:
        now = engine_stats(app, len(before))
        return now if all(s["running"] == s["waiting"] == 0 for s in now.values()) else None

    now = wait_until(idle, within, every=0.05) or engine_stats(app, len(before))
    assert all(s["running"] == s["waiting"] == 0 for s in now.values()), now
    assert all(s["free_blocks"] == s["total_blocks"] for s in now.values()), now
    count = sum(s["requests_aborted"] for s in now.values()) - sum(s["requests_aborted"] for s in before.values())
    assert count == aborted, (count, now)


@pytest.fixture(scope="session")
def master_key_file(tmp_path_factory) -> Path:
    """The master key every Ray process of the session gets, as an operator gives it (LLMAAS_MASTER_KEY_FILE in
    the environment Ray starts from). Only roots marked encrypted use it (test_encryption's app)."""
    from llmaas.app.storage.encrypted import MASTER_KEY_FILE_ENV, new_master_key

    path = tmp_path_factory.mktemp("secrets") / "master.key"
    path.write_text(new_master_key())
    os.environ[MASTER_KEY_FILE_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(s3_server, master_key_file):
    """One Ray for the session, started after the S3 test server so every Ray worker inherits its AWS_* env
    (and the master key)."""
    import ray
    from ray import serve

    from llmaas.deployments.config import PROXY_ENV_VARS

    os.environ.update(PROXY_ENV_VARS)  # the proxy as `make serve` starts it (its Ray inherits this environment)
    # Logical CPUs: the stages ask for fractions, and two apps (tiny + default model) share the box.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, _metrics_export_port=free_port())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def release_root_actors(storage_root: str) -> None:
    """Kills the detached actors of a module's own storage root (registry, usage, access, job runner, with the
    Ray Train controllers a job runner owns) once its app is deleted: later modules then do not share two cores
    and the memory with a few idle GB of actors nobody will call again."""
    import ray

    from llmaas.deployments.registry_service import actor_name

    for kind in ("registry", "usage", "access", "jobs"):
        try:
            ray.kill(ray.get_actor(actor_name(kind, storage_root), namespace="llmaas"))
        except ValueError:  # never made
            pass


def new_storage_root(tmp_path_factory, s3_server: str, name: str) -> str:
    """A fresh storage root: a temp dir, or with LLMAAS_TEST_STORAGE=s3 a new bucket on the S3 test server."""
    if os.environ.get("LLMAAS_TEST_STORAGE", "local") == "s3":
        bucket = f"{name}-{uuid.uuid4().hex[:8]}"
        make_bucket(s3_server, bucket)
        return f"s3://{bucket}/llmaas"
    return str(tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory, s3_server) -> str:
    return new_storage_root(tmp_path_factory, s3_server, "storage")


@pytest.fixture(scope="session")
def app_args(tiny_chat_dir, storage_root) -> dict:
    return {"model": {"source": str(tiny_chat_dir), "served_name": "tiny-chat"},
            # float32: the parity tests compare served tokens and logprobs with transformers in float32
            "engine": {"torch_threads": 1, "max_num_seqs": 16, "kv_cache_memory_gb": 0.05, "dtype": "float32"},
            # the response cache stays off here: every answer comes from the engine (test_response_cache turns it on)
            "storage_root": str(storage_root), "max_upload_mb": 1, "response_cache_size": 0}


@pytest.fixture(scope="session")
def serve_app(ray_cluster, app_args):
    """The app exactly as serve_config.yaml builds it (its import_path), with the tiny model as args."""
    import yaml
    from ray import serve
    from ray.serve._private.utils import import_attr

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    spec = config["applications"][0]
    builder = import_attr(spec["import_path"])
    handle = serve.run(builder(app_args), name=APP, route_prefix="/")
    return handle


@pytest.fixture(scope="session")
def base_url(ray_cluster, serve_app) -> str:
    return ray_cluster


@pytest.fixture(scope="session")
def client(base_url, storage_root):
    import openai

    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    c._storage_root = str(storage_root)  # lets tests look at what the service wrote
    return c


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    import ray

    return f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"
