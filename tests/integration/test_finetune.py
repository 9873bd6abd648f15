"""Real Ray Train: 2 CPU workers fine-tune a tiny Llama; the adapter loads in PEFT and in our engine alike."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import ray
import torch

from tests.integration.conftest import live_train_actors, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples" / "sentiment"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:64]) + "\n")
    (d / "val.jsonl").write_text("\n".join((EXAMPLES / "val.jsonl").read_text().splitlines()[:16]) + "\n")
    return d


def make_job(tiny_chat_dir, data_files, storage, **overrides):
    from llmaas.training import FineTuneJob

    raw = dict(name="sentiment", base_model=str(tiny_chat_dir), train_files=[str(data_files / "train.jsonl")],
               validation_file=str(data_files / "val.jsonl"), epochs=2, batch_size=8, learning_rate=1e-2,
               warmup_ratio=0.0, lr_schedule="constant", max_length=128, num_workers=2, cpus_per_worker=1,
               storage_root=str(storage),
               eval={"metrics": ["loss", "accuracy"], "labels": ["positive", "negative"], "max_new_tokens": 3})
    raw.update(overrides)
    return FineTuneJob.model_validate(raw)


def test_two_worker_job_learns_and_adapter_serves_like_peft(ray_cluster, tiny_chat_dir, data_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
    from llmaas.training.jobs import run_job
    from llmaas.training.store import JobStore

    job = make_job(tiny_chat_dir, data_files, tmp_path)
    record = run_job(job, "ftjob-test-ok")
    assert record.status == "succeeded", record.error
    events = JobStore(tmp_path).events("ftjob-test-ok")
    losses = [e["data"]["train_loss"] for e in events if e["type"] == "metrics"]
    assert len(losses) == 8  # 64 rows / 2 workers / batch 8 = 4 steps per epoch, 2 epochs
    assert losses[-1] < losses[0]
    assert sum(e["type"] == "checkpoint" for e in events) == 2  # one per epoch
    assert record.metrics["loss"] < record.metrics_before["loss"]

    adapter = Path(record.adapter_dir)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "metadata.json"]
    meta = json.loads((adapter / "metadata.json").read_text())
    assert meta["job_id"] == "ftjob-test-ok" and len(meta["base_fingerprint"]) == 64
    assert meta["metrics"] == record.metrics and meta["data_sha256"]

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 30, 2, 198, 1, 520, 9531, 198]
    ids = torch.tensor([prompt])
    expected = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                   do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    engine = LLMEngine(base, EngineConfig(max_model_len=128, num_kv_blocks=32, max_loras=1, max_lora_rank=8))
    engine.add_lora("sentiment", str(adapter))
    got = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), ["sentiment"])
    assert got[0] == expected


def test_killed_worker_resumes_from_last_checkpoint_and_trains_every_row_once_per_epoch(
        ray_cluster, tiny_chat_dir, data_files, tmp_path):
    from llmaas.training.jobs import run_job
    from llmaas.training.store import JobStore

    # 64 rows, 2 workers, micro-batches of 4, 2 per step: 4 steps per epoch; checkpoints at steps 3, 4 (epoch
    # end) and 6; rank 1's process is SIGKILLed right after step 7.
    job = make_job(tiny_chat_dir, data_files, tmp_path, batch_size=4, grad_accum=2, checkpoint_every_steps=3,
                   fault_injection_step=7, trace_rows=True, eval={"metrics": ["loss"]})
    record = run_job(job, "ftjob-test-fault")
    assert record.status == "succeeded", record.error
    events = JobStore(tmp_path).events("ftjob-test-fault")
    resumed = [e["data"]["step"] for e in events if e["type"] == "resumed"]
    assert resumed == [6]  # the last checkpoint before the kill (mid-epoch), not a restart from 0
    assert sum(e["type"] == "worker" for e in events) == 4  # 2 workers, started twice
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 7, 8]  # rank 0 logged step 7 before rank 1 died; only 7 is redone

    # What the final adapter was trained on: each attempt's micro-batches (every worker tags its attempt with the
    # checkpoint step it started from) up to the step the next attempt resumed from.
    logged = [e["data"] for e in events if e["type"] == "rows"]
    starts = sorted({t["attempt_from"] for t in logged})
    assert starts == [0, 6]
    trained = [t for t in logged if t["attempt_from"] == 6 or t["step"] <= 6]
    for epoch in (0, 1):
        rows = sorted(r for t in trained if t["epoch"] == epoch for r in t["rows"])
        assert rows == list(range(64)), f"epoch {epoch}: a row trained twice or never"
    orders = [[r for t in trained if t["epoch"] == epoch and t["rank"] == 0 for r in t["rows"]] for epoch in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled each epoch

    checkpoints = [p for p in (tmp_path / "ray_runs").rglob("*") if p.is_file() and "checkpoint_" in str(p)]
    assert checkpoints and {p.suffix for p in checkpoints} <= {".safetensors", ".json"}, checkpoints  # no pickle
    outputs = list((tmp_path / "outputs").iterdir())
    assert [p.name for p in outputs] == ["ftjob-test-fault"]  # published once


def test_bad_data_fails_before_any_worker(ray_cluster, tiny_chat_dir, tmp_path):
    from llmaas.training.jobs import run_job

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    job = make_job(tiny_chat_dir, tmp_path, tmp_path / "store", train_files=[str(bad)], validation_file=None)
    record = run_job(job, "ftjob-test-bad")
    assert record.status == "failed" and "bad.jsonl:2" in record.error
    assert not (tmp_path / "store" / "ray_runs").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    record = run_job(make_job(tiny_chat_dir, tmp_path, tmp_path / "store", train_files=[str(empty)],
                              validation_file=None), "ftjob-test-empty")
    assert record.status == "failed" and "empty" in record.error


def test_python_api_submit_and_wait(ray_cluster, tiny_chat_dir, data_files, tmp_path):
    from llmaas.training import submit

    handle = submit(make_job(tiny_chat_dir, data_files, tmp_path, epochs=1, eval={"metrics": ["loss"]}))
    assert handle.status().status in ("queued", "running")
    record = handle.wait(timeout=300)
    assert record.status == "succeeded", record.error
    assert Path(record.adapter_dir, "adapter_model.safetensors").is_file()
    assert [e["data"]["step"] for e in handle.events() if e["type"] == "metrics"] == [1, 2, 3, 4]
    assert handle.cancel().status == "succeeded"  # a finished job stays as it ended


def test_job_the_cluster_can_never_hold_fails_at_once(ray_cluster, tiny_chat_dir, data_files, tmp_path):
    from llmaas.training.jobs import run_job
    from llmaas.training.store import JobStore

    started = time.monotonic()
    record = run_job(make_job(tiny_chat_dir, data_files, tmp_path, cpus_per_worker=64), "ftjob-test-huge")
    assert time.monotonic() - started < 30
    assert record.status == "failed" and record.error_code == "resources_unavailable"
    assert "needs 2 worker(s) x CPU 64 but the whole cluster has CPU" in record.error
    assert not (tmp_path / "ray_runs").exists()  # no trainer was started
    assert JobStore(tmp_path).events("ftjob-test-huge")[-1]["data"]["code"] == "resources_unavailable"


def test_job_waiting_for_taken_resources_says_so_then_fails(ray_cluster, tiny_chat_dir, data_files, tmp_path):
    from ray.util.placement_group import placement_group, remove_placement_group

    from llmaas.training import submit

    free = ray.available_resources()["CPU"]
    hog = placement_group([{"CPU": free}])  # the cluster is busy: every free CPU is taken
    assert hog.wait(timeout_seconds=30)
    try:
        started = time.monotonic()
        handle = submit(make_job(tiny_chat_dir, data_files, tmp_path, num_workers=None, cpus_per_worker=None,
                                 resource_wait_s=6))
        waiting = wait_until(lambda: [e for e in handle.events() if e["message"].startswith("waiting for resources")],
                             timeout=30)
        assert time.monotonic() - started < 20  # said within seconds, not after the wait
        assert "needs 1 worker(s) x CPU 0.1, free CPU 0" in waiting[0]["message"]  # nothing free: smallest plan
        record = handle.wait(timeout=60)
        assert record.status == "failed" and record.error_code == "resources_unavailable", record
        assert "waited 6 s" in record.error
    finally:
        remove_placement_group(hog)
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) >= free - 1e-6, timeout=30)


def test_cancel_frees_the_trainer_and_its_workers(ray_cluster, tiny_chat_dir, data_files, tmp_path):
    from llmaas.training import submit

    free, before = ray.available_resources()["CPU"], live_train_actors()
    handle = submit(make_job(tiny_chat_dir, data_files, tmp_path, epochs=100, eval={"metrics": ["loss"]}))
    assert wait_until(lambda: any(e["type"] == "metrics" for e in handle.events()), timeout=180)
    started = set(live_train_actors()) - set(before)
    assert sorted(live_train_actors()[a] for a in started) == ["RayTrainWorker", "RayTrainWorker", "TrainController"]
    assert ray.available_resources().get("CPU", 0) < free  # its workers hold CPUs
    assert handle.cancel().status == "cancelled"
    assert wait_until(lambda: not started & set(live_train_actors()), timeout=60), live_train_actors()
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) >= free - 1e-6, timeout=30)
    assert handle.status().status == "cancelled"
