"""An app restart loses nothing: registry, aliases, files and job records survive; a job cut off is marked failed."""
from __future__ import annotations

import io
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from llmaas.app.registry import Registry
from llmaas.deployments.builder import build_app
from llmaas.deployments.registry_service import actor_name
from tests.integration.conftest import new_storage_root

APP = "restart-app"


@pytest.fixture(scope="module")
def restart_setup(ray_cluster, app_args, tmp_path_factory, s3_server):
    storage = new_storage_root(tmp_path_factory, s3_server, "restart-storage")  # a bucket with LLMAAS_TEST_STORAGE=s3
    args = {**app_args, "storage_root": storage, "finetuning": {"num_workers": 1}}
    serve.run(build_app(args), name=APP, route_prefix="/restart")
    client = openai.OpenAI(base_url=f"{ray_cluster}/restart/v1", api_key="unused", max_retries=0, timeout=60)
    return args, client, storage


def test_a_registry_restored_to_an_older_generation_is_taken(restart_setup, tiny_chat_dir, ray_cluster, tmp_path):
    """An operator restores registry/ from a backup (its newest generation is older than what Routers saw): the
    registry moves its generation past theirs and they take the restored state, instead of ignoring it (and
    long-polling in a hot loop)."""
    from transformers import AutoModelForCausalLM

    from tests.integration.conftest import wait_until
    from tests.models import make_peft_adapter

    _args, client, storage = restart_setup
    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "g", seed=6)

    def register(name: str) -> None:
        r = httpx.post(f"{ray_cluster}/restart/v1/adapters", json={"name": name, "path": adapter, "promote": True},
                       timeout=60)
        assert r.status_code == 200, r.text

    def models() -> set[str]:
        return {m.id for m in client.models.list().data}

    register("older")
    registry = Registry(storage)
    backup = set(registry.doc.generations())
    register("newer")
    assert wait_until(lambda: "newer" in models(), timeout=10)
    for generation in set(registry.doc.generations()) - backup:  # the restore, then the registry actor re-reads
        registry.storage.delete(registry.doc.key(generation))
    ray.get(ray.get_actor(actor_name("registry", storage), namespace="llmaas").reload.remote())
    assert wait_until(lambda: "newer" not in models() and "older" in models(), timeout=10), models()


def test_state_survives_restart_and_interrupted_job_is_failed(restart_setup, tiny_chat_dir, ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.models import make_peft_adapter

    args, client, storage = restart_setup
    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "a", seed=5)
    r = httpx.post(f"{ray_cluster}/restart/v1/adapters", json={"name": "keep", "path": adapter, "promote": True},
                   timeout=60)
    assert r.status_code == 200, r.text
    rows = b'{"prompt": "a", "completion": "b"}\n' * 64
    f = client.files.create(file=("t.jsonl", io.BytesIO(rows)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=f.id, hyperparameters={"n_epochs": 100})
    deadline = time.monotonic() + 60
    while client.fine_tuning.jobs.retrieve(job.id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    before = client.chat.completions.create(model="keep", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0).choices[0].message.content

    # The app goes down with its job runner (Serve replicas and the runner actor both die), then comes back.
    serve.delete(APP)
    runner = ray.get_actor(actor_name("jobs", storage), namespace="llmaas")
    ray.kill(runner, no_restart=False)
    serve.run(build_app(args), name=APP, route_prefix="/restart")

    assert f.id in {x.id for x in client.files.list().data}
    ids = {m.id for m in client.models.list().data}
    assert {"keep", "keep@1"} <= ids
    after = client.chat.completions.create(model="keep", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
    assert after.model == "keep@1" and after.choices[0].message.content == before
    deadline = time.monotonic() + 30
    while (record := client.fine_tuning.jobs.retrieve(job.id)).status not in ("failed", "succeeded") \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert record.status == "failed" and "interrupted" in record.error.message
    serve.delete(APP)
