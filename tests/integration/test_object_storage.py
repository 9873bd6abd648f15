"""The whole loop with storage_root on an S3-compatible server: nothing on a shared disk.

Upload -> fine-tune (Ray Train checkpoints in the bucket) -> register -> serve through two Router replicas, the
model replica pulling the version from the bucket -> the app and its actors restart (fresh replicas, nothing
cached) -> everything is still there and answers the same.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import uuid
from pathlib import Path

import openai
import pytest
import ray
from ray import serve

from llmaas.app.storage import open_storage
from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.registry_service import actor_name
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer
from tests.integration.conftest import engine_stats
from tests.s3server import make_bucket

APP = "s3-app"
EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples" / "sentiment"
MSG = [{"role": "user", "content": "The blender broke after two days, terrible."}]


def _app(cfg: AppConfig):
    light = {"ray_actor_options": {"num_cpus": 0.1}}
    return Router.options(num_replicas=2, **light).bind(
        Tokenizer.options(**light).bind(cfg),
        LLMServer.options(ray_actor_options={"num_cpus": 0.5}).bind(cfg), cfg)


@pytest.fixture(scope="module")
def s3_app(ray_cluster, app_args, s3_server):
    bucket = f"loop-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    root = f"s3://{bucket}/llmaas"
    cfg = AppConfig.model_validate({**app_args, "storage_root": root, "finetuning": {"num_workers": 1}})
    serve.run(_app(cfg), name=APP, route_prefix="/s3")
    client = openai.OpenAI(base_url=f"{ray_cluster}/s3/v1", api_key="unused", max_retries=0, timeout=120)
    yield cfg, client, root
    serve.delete(APP)


def _chat(client: openai.OpenAI, model: str) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=6, temperature=0)
    return r.model, r.choices[0].message.content


def test_upload_finetune_serve_restart_all_on_object_storage(s3_app, ray_cluster):
    from tests.integration.test_finetuning_api import wait_for

    cfg, client, root = s3_app
    storage = open_storage(root)
    rows = "\n".join((EXAMPLES / "train.jsonl").read_text().splitlines()[:32]) + "\n"
    f = client.files.create(file=("train.jsonl", io.BytesIO(rows.encode())), purpose="fine-tune")
    assert storage.read(f"files/{f.id}.jsonl") == rows.encode()  # the upload lives in the bucket

    job = client.fine_tuning.jobs.create(model="base", training_file=f.id, suffix="s3mood",
                                         hyperparameters={"n_epochs": 1, "batch_size": 8},
                                         extra_body={"llmaas": {"max_length": 128, "checkpoint_every_steps": 2,
                                                                "eval": {"metrics": ["loss"]}}})
    done = wait_for(client, job.id, timeout=400)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "s3mood@1"
    checkpoints = [k for k in storage.list(f"ray_runs/{job.id}") if k.endswith("trainer_state.json")]
    assert checkpoints, storage.list(f"ray_runs/{job.id}")[:20]  # Ray Train checkpointed into the bucket
    assert storage.list(f"outputs/{job.id}/adapter")  # and the job published its adapter there

    # Eight requests in flight at once, through both Routers; the model replica pulled the version from the bucket.
    with cf.ThreadPoolExecutor(8) as pool:
        answers = set(pool.map(lambda _: _chat(client, "s3mood"), range(8)))
    assert len(answers) == 1 and next(iter(answers))[0] == "s3mood@1", answers
    assert [s["adapter_loads"] for s in engine_stats(APP).values()] == [1]

    # Everything goes down: the app, the registry actor and the job runner; then it all comes back.
    serve.delete(APP)
    for kind in ("registry", "jobs"):
        ray.kill(ray.get_actor(actor_name(kind, root), namespace="llmaas"), no_restart=False)
    serve.run(_app(cfg), name=APP, route_prefix="/s3")
    assert f.id in {x.id for x in client.files.list().data}
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert {"s3mood", "s3mood@1"} <= {m.id for m in client.models.list().data}
    assert _chat(client, "s3mood") == next(iter(answers))  # the same version, the same answer
