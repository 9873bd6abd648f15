"""One Ray instance and one Serve app per test session: the real graph, real HTTP, a tiny chat model."""
from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


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


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    # Logical CPUs: the stages ask for fractions, and two apps (tiny + default model) share the box.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, _metrics_export_port=free_port())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def app_args(tiny_chat_dir, storage_root) -> dict:
    return {"model": {"source": str(tiny_chat_dir), "served_name": "tiny-chat"},
            # float32: the parity tests compare served tokens and logprobs with transformers in float32
            "engine": {"torch_threads": 1, "max_num_seqs": 16, "kv_cache_memory_gb": 0.05, "dtype": "float32"},
            "storage_root": str(storage_root), "max_upload_mb": 1, "response_cache_size": 256}


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
