"""The whole loop with the official openai client: upload, fine-tune on Ray Train, chat with the new version."""
from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
import torch

from llmaas.app.storage import open_storage
from tests.integration.conftest import live_train_actors, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples" / "sentiment"
REVIEW = [{"role": "system", "content": "Classify the sentiment of the review. Answer with exactly one word: "
                                        "positive or negative."},
          {"role": "user", "content": "The blender broke after two days, terrible."}]
EXT = {"max_length": 128, "warmup_ratio": 0.0, "lr_schedule": "constant",
       "eval": {"metrics": ["loss", "accuracy"], "labels": ["positive", "negative"], "max_new_tokens": 3}}


def wait_for(client, job_id: str, timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def training_file(client):
    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()[:64]
    return client.files.create(file=("train.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())),
                               purpose="fine-tune")


def test_upload_finetune_and_chat_with_the_new_version(client, training_file, tiny_chat_dir, default_tokenizer,
                                                        tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert training_file.id.startswith("file-") and training_file.bytes > 0
    job = client.fine_tuning.jobs.create(model="base", training_file=training_file.id, suffix="mood",
                                         hyperparameters={"n_epochs": 1, "batch_size": 8,
                                                          "learning_rate_multiplier": 50},
                                         extra_body={"llmaas": EXT})
    assert job.status in ("queued", "running")
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "mood@1"
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    kinds = {e.type for e in events}
    assert {"metrics", "checkpoint", "eval", "registered"} <= kinds
    plans = [e for e in events if e.type == "resources"]  # no finetuning settings in the app: auto
    assert len(plans) == 1 and plans[0].data["num_workers"] == 2  # the default two workers, sharing free CPUs
    assert 0.1 <= plans[0].data["cpus_per_worker"] <= 1.0
    assert job.id in {j.id for j in client.fine_tuning.jobs.list().data}
    # training is metered to the version it made: tokens x epochs and worker-seconds, once the job reads succeeded
    usage = httpx.get(str(client.base_url).rstrip("/") + "/usage", params={"group_by": "kind,model"},
                      timeout=30).json()
    trained = [row for row in usage["data"] if row["kind"] == "training" and row["model"] == "mood@1"]
    assert len(trained) == 1 and trained[0]["training_tokens"] == done.trained_tokens > 0
    assert trained[0]["training_compute_s"] > 0 and trained[0]["requests"] == 0

    r = client.chat.completions.create(model=done.fine_tuned_model, messages=REVIEW, max_tokens=6, temperature=0)
    alias = client.chat.completions.create(model="mood", messages=REVIEW, max_tokens=6, temperature=0)
    assert alias.model == "mood@1" and alias.choices[0].message.content == r.choices[0].message.content

    record_dir = httpx.get(str(client.base_url).rstrip("/") + "/adapters", timeout=30).json()[
        "adapters"]["mood"]["versions"]["1"]["path"]
    assert record_dir.startswith("adapters/mood/")
    local = tmp_path / "published"
    open_storage(client._storage_root).download_dir(record_dir, local)  # what the registry published, wherever
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(local)).eval()
    prompt_ids = default_tokenizer.apply_chat_template(REVIEW, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    ids = torch.tensor([prompt_ids])
    out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False)[0, len(prompt_ids):].tolist()
    assert r.choices[0].message.content == default_tokenizer.decode(out, skip_special_tokens=True)


def test_missed_eval_threshold_keeps_a_candidate(client, training_file):
    # a loss of at most 0 is never reached; loss alone: no answers generated, before or after training
    ext = {**EXT, "eval": {"metrics": ["loss"], "thresholds": {"loss": 0.0}}}
    job = client.fine_tuning.jobs.create(model="base", training_file=training_file.id, suffix="gated",
                                         hyperparameters={"n_epochs": 1}, extra_body={"llmaas": ext})
    done = wait_for(client, job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "gated@1"
    with pytest.raises(openai.NotFoundError, match="no promoted version"):
        client.chat.completions.create(model="gated", messages=REVIEW, max_tokens=2)
    assert client.chat.completions.create(model="gated@1", messages=REVIEW, max_tokens=2).model == "gated@1"


def test_cancel_a_running_job_frees_its_workers(client, training_file):
    free, before = ray.available_resources()["CPU"], live_train_actors()
    job = client.fine_tuning.jobs.create(model="base", training_file=training_file.id, suffix="cancelme",
                                         method={"type": "supervised",
                                                 "supervised": {"hyperparameters": {"n_epochs": 50}}},
                                         extra_body={"llmaas": EXT})
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 50
    assert wait_until(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data),
                      timeout=180)  # its workers are training
    started = set(live_train_actors()) - set(before)
    assert sorted(live_train_actors()[a] for a in started) == ["RayTrainWorker", "RayTrainWorker", "TrainController"]
    assert ray.available_resources()["CPU"] < free  # its workers hold CPUs
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert wait_until(lambda: not started & set(live_train_actors()), timeout=60), live_train_actors()
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) >= free - 1e-6, timeout=30)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert "cancelme" not in {m.id for m in client.models.list().data}


def test_a_tenant_has_at_most_max_jobs_per_tenant_at_once(client, training_file):
    def create(suffix: str):
        return client.fine_tuning.jobs.create(model="base", training_file=training_file.id, suffix=suffix,
                                              hyperparameters={"n_epochs": 50}, extra_body={"llmaas": EXT})

    jobs = [create("cap-a"), create("cap-b")]  # max_jobs_per_tenant: 2 by default
    try:
        with pytest.raises(openai.RateLimitError) as err:
            create("cap-c")
        assert err.value.body["code"] == "too_many_jobs" and err.value.response.headers["retry-after"] == "60"
    finally:
        for job in jobs:
            assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    job = create("cap-d")  # cancelled jobs no longer count
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


@pytest.mark.parametrize("content, status, fragment", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n', 400, "train.jsonl:2"),
    (b"not json\n", 400, "train.jsonl:1: invalid JSON"),
    (b"", 400, "no rows"),
    (b'{"prompt": "a", "completion": "b"}\n' * 40000, 413, "exceeds"),
])
def test_bad_uploads_are_rejected(client, content, status, fragment):
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert err.value.status_code == status and fragment in err.value.message


@pytest.mark.parametrize("kwargs, param", [
    ({"training_file": "file-doesnotexist"}, "file_id"),
    ({"training_file": "../../etc/passwd"}, "file_id"),
    ({"model": "gpt-4"}, "model"),
    ({"suffix": "Bad Name"}, "suffix"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"method": {"type": "dpo", "dpo": {}}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
      "hyperparameters": {"n_epochs": 2}}, "method"),
    ({"extra_body": {"llmaas": {"lora": {"r": 0}}}}, "llmaas.lora.r"),
    ({"extra_body": {"llmaas": {"storage_root": "/"}}}, "llmaas.storage_root"),
    ({"extra_body": {"llmaas": {"num_workers": 64}}}, "llmaas.num_workers"),
    ({"extra_body": {"llmaas": {"cpus_per_worker": 8}}}, "llmaas.cpus_per_worker"),
])
def test_bad_job_requests_name_the_field(client, training_file, kwargs, param):
    args = {"model": "base", "training_file": training_file.id, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.fine_tuning.jobs.create(**args)
    assert err.value.status_code in (400, 404)
    assert err.value.body["param"] == param, err.value.body
