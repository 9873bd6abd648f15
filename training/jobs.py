"""Fine-tuning jobs: validate data, run the TorchTrainer, evaluate, publish the adapter.

Python API::

    from llmaas.training import FineTuneJob, submit
    handle = submit(FineTuneJob(name="sentiment", train_files=["train.jsonl"]))
    record = handle.wait()          # JobRecord: status, metrics, adapter_dir
    handle.cancel()                 # stops a running job

``run_job`` does the work and runs as a Ray task (``submit``) or inline (tests, CLI).
Nothing is published unless training and evaluation both finish: the adapter directory
appears atomically, complete with metadata.json.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import AutoTokenizer

from llmaas.app.config import ModelSettings
from llmaas.app.model_source import model_fingerprint, resolve_model
from llmaas.app.storage import Storage
from llmaas.training.checkpoint import publish_adapter
from llmaas.training.config import FineTuneJob
from llmaas.training.data import DataError, files_hash, parse_jsonl, read_source, split, tokenize_rows
from llmaas.training.evaluate import evaluate, passes
from llmaas.training.recipe import RecipeConfig, train_loop_per_worker
from llmaas.training.resources import ResourcesUnavailable, WorkerPlan, free_resources, plan_workers, reserve
from llmaas.training.store import TERMINAL, JobRecord, JobStore, new_job_id

OnSuccess = Callable[[JobRecord], JobRecord]
CANCEL_GRACE_S = 30.0  # a graceful cancel (Train aborts its controller) took ~2 s on a 2-core box
CONTROLLER_RETRIES = 2  # Ray Train worker-group start failures tolerated (each waits up to 60 s)


class JobError(RuntimeError):
    pass


ERROR_CODES = {DataError: "invalid_training_file", ResourcesUnavailable: "resources_unavailable"}


def prepare_data(job: FineTuneJob, tokenizer, storage: Storage):
    """Reads (in memory, through ``storage`` for uploaded files), validates and tokenizes; returns (train, val,
    skipped, sha256 of the files). Raises DataError before any worker starts."""
    files = [read_source(p, storage) for p in job.train_files]
    val_file = read_source(job.validation_file, storage) if job.validation_file else None
    rows, skipped = [], 0
    for name, data in files:
        r, s = parse_jsonl(name, data, job.format, job.on_bad_line)
        rows += r
        skipped += s
    if not rows:
        raise DataError(f"training data is empty ({', '.join(job.train_files)})")
    examples, s = tokenize_rows(tokenizer, rows, job.max_length, job.on_bad_line)
    skipped += s
    if val_file is not None:
        vrows, s = parse_jsonl(*val_file, job.format, job.on_bad_line)
        val, s2 = tokenize_rows(tokenizer, vrows, job.max_length, job.on_bad_line)
        skipped += s + s2
        train = examples
    else:
        train, val = split(examples, job.validation_split, job.seed)
    need = job.num_workers * job.batch_size * job.grad_accum
    if len(train) < job.num_workers:
        raise DataError(f"{len(train)} training rows cannot feed {job.num_workers} workers")
    if len(train) // job.num_workers < job.grad_accum:
        raise DataError(f"{len(train)} training rows are too few for one optimizer step (need ~{need})")
    return train, val, skipped, files_hash([data for _, data in files + ([val_file] if val_file else [])])


def run_job(job: FineTuneJob, job_id: str, on_success: OnSuccess | None = None) -> JobRecord:
    """Runs one job to completion; the record under storage_root says how it ended."""
    store = JobStore(job.storage_root)
    if store.get(job_id) is None:
        store.save(JobRecord(id=job_id, job=json.loads(job.model_dump_json())))
    store.update(job_id, status="running")
    store.add_event(job_id, "status", "job started")
    try:
        record = _run(job, job_id, store)
        if store.update_if(job_id, lambda r: not r.cancel_requested, publishing=True) is None:
            return store.get(job_id)  # cancelled first: nothing is registered; the canceller records the end
        if on_success is not None:
            record = on_success(record)  # e.g. registration: the job only succeeds once it is done
        store.add_event(job_id, "status", f"job succeeded: {record.adapter_dir}")
        return store.update(job_id, status="succeeded")
    except Exception as exc:  # the record must say why, whatever failed
        if (current := store.get(job_id)).cancel_requested:
            return current  # the training run was aborted by a cancel: not a failure
        message = str(exc) if isinstance(exc, (DataError, JobError, ResourcesUnavailable)) else \
            f"{type(exc).__name__}: {exc}"
        code = ERROR_CODES.get(type(exc), "job_failed")
        store.add_event(job_id, "error", message, {"code": code})
        return store.update(job_id, status="failed", error=message, error_code=code)


def _run(job: FineTuneJob, job_id: str, store: JobStore) -> JobRecord:
    started = time.time()
    base = resolve_model(ModelSettings(source=job.base_model, cache_dir=job.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    free = free_resources()
    plan = plan_workers(free["CPU"], free.get("GPU", 0.0), job.num_workers, job.cpus_per_worker, job.use_gpu)
    job = job.model_copy(update={"num_workers": plan.num_workers, "cpus_per_worker": plan.cpus_per_worker})
    store.update(job_id, job=json.loads(job.model_dump_json()))
    _say(store, job_id, "resources", f"{plan.describe()} ({plan.reason})", _plan_data(plan))
    train, val, skipped, data_sha256 = prepare_data(job, tokenizer, store.storage)
    store.add_event(job_id, "data", f"{len(train)} train / {len(val)} validation rows, {skipped} skipped",
                    {"train": len(train), "validation": len(val), "skipped": skipped})
    reserve(plan, job.placement_strategy, job.resource_wait_s,
            on_wait=lambda message: _say(store, job_id, "resources", message))
    rows_per_worker = len(train) // job.num_workers
    steps_per_epoch = max(1, math.ceil(rows_per_worker / job.batch_size) // job.grad_accum)
    rows = ray.put([(e.input_ids, e.labels) for e in train])  # once in the object store; workers deal by rank
    recipe = RecipeConfig(job=job, job_id=job_id, base_path=base.path, pad_id=tokenizer.pad_token_id or 0,
                          steps_per_epoch=steps_per_epoch, train_rows=rows)
    tenant = store.storage.for_tenant((store.get(job_id) or JobRecord(id=job_id)).owner)  # its data key if sealed
    runs_fs, runs_path = tenant.arrow_filesystem()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe},
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker=plan.bundle, placement_strategy=job.placement_strategy),
        # checkpoints go to the storage root too (a path or a bucket), through the same filesystem as the rest
        run_config=RunConfig(name=job_id, storage_path=f"{runs_path}/ray_runs", storage_filesystem=runs_fs,
                             # a worker group that cannot start (its resources taken since reserve()) is retried
                             # a few times, not forever as Ray Train's default would
                             failure_config=FailureConfig(max_failures=job.max_failures,
                                                          controller_failure_limit=CONTROLLER_RETRIES),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    fit_started = time.time()
    result = trainer.fit()
    compute_seconds = (time.time() - fit_started) * plan.num_workers
    if result.error is not None:
        raise JobError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise JobError("training finished without a checkpoint")
    train_seconds = time.time() - started
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if not state.get("final"):
            raise JobError("the last checkpoint is not the final one")
        ev = job.eval
        store.add_event(job_id, "eval", "evaluating base model and adapter on the validation set")
        after = evaluate(base.path, str(ckpt), val, tokenizer, ev.metrics, ev.labels, ev.max_new_tokens,
                         ev.max_examples, ev.json_schema)
        before = evaluate(base.path, None, val, tokenizer, ev.metrics, ev.labels, ev.max_new_tokens,
                          ev.max_examples, ev.json_schema)
        ok, failures = passes(after, ev.thresholds)
        metadata = {
            "job_id": job_id, "name": job.name, "base_model": base.served_name, "base_path": base.path,
            "base_fingerprint": model_fingerprint(base.path), "config": json.loads(job.model_dump_json()),
            "metrics": after, "metrics_before": before, "eval_passed": ok, "eval_failures": failures,
            "data_sha256": data_sha256,
            "train_rows": len(train), "validation_rows": len(val), "global_step": state["global_step"],
            "trained_tokens": state["tokens_seen"], "train_seconds": round(train_seconds, 2),
            "created_at": int(time.time()),
        }
        key = f"outputs/{job_id}/adapter"
        publish_adapter(ckpt, tenant, key, {"metadata.json": json.dumps(metadata, indent=2)})
    store.add_event(job_id, "eval", f"metrics {after} (base: {before}); thresholds "
                    f"{'met' if ok else 'missed: ' + ', '.join(failures)}", {"metrics": after, "before": before})
    # the record names the adapter only once every file is there
    return store.update(job_id, adapter_dir=store.storage.url(key), metrics=after, metrics_before=before,
                        eval_passed=ok, trained_tokens=state["tokens_seen"], compute_seconds=round(compute_seconds, 3))


def _say(store: JobStore, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
    """An event in the job's record, also printed: `llmaas finetune` shows it, a Ray task logs it."""
    store.add_event(job_id, kind, message, data)
    print(f"[{job_id}] {message}", flush=True)


def _plan_data(plan: WorkerPlan) -> dict[str, Any]:
    return {"num_workers": plan.num_workers, "cpus_per_worker": plan.cpus_per_worker,
            "gpus_per_worker": plan.gpus_per_worker}


class JobHandle:
    """A submitted job: poll, wait, cancel."""

    def __init__(self, job_id: str, storage_root: Path, ref: Any) -> None:
        self.id = job_id
        self._store = JobStore(storage_root)
        self._ref = ref

    def status(self) -> JobRecord:
        record = self._store.get(self.id)
        assert record is not None
        return record

    def events(self) -> list[dict[str, Any]]:
        return self._store.events(self.id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        ray.wait([self._ref], timeout=timeout)
        return self.status()

    def cancel(self) -> JobRecord:
        return cancel_job(self._store, self.id, self._ref)


def cancel_job(store: JobStore, job_id: str, ref: Any | None) -> JobRecord:
    """Stops a job's Ray task (``ref``) and records it cancelled: the one cancel path (Python and API).

    First a graceful cancel: Ray raises KeyboardInterrupt in the task, Ray Train's SIGINT handler aborts
    its controller, and the controller stops the workers and removes their placement group. A force kill
    would leave that placement group (and its CPUs) held: Train's detached cleaner watches the controller
    through the state API, which a cluster without the dashboard does not have. Only a task that ignores
    the graceful cancel for CANCEL_GRACE_S is killed.
    """
    record = store.get(job_id)
    if record is None:
        raise KeyError(job_id)
    if record.status in TERMINAL:
        return record
    # Cancellation and publication are ordered by one compare-and-set on the record: whichever comes first wins.
    claimed = store.update_if(job_id, lambda r: r.status not in TERMINAL and not r.publishing
                              and not r.cancel_requested, cancel_requested=True)
    if claimed is None:  # publication won, or another cancel is already stopping it
        record = store.get(job_id)
        if record.publishing and record.status not in TERMINAL:
            store.add_event(job_id, "status", "cancel refused: the job is already publishing its adapter")
        return record
    if ref is not None:
        ray.cancel(ref, force=False)
        if not ray.wait([ref], timeout=CANCEL_GRACE_S)[0]:
            ray.cancel(ref, force=True)
            ray.wait([ref], timeout=CANCEL_GRACE_S)
    store.add_event(job_id, "status", "job cancelled")
    return store.update(job_id, status="cancelled")


def submit(job: FineTuneJob | dict[str, Any], on_success: OnSuccess | None = None) -> JobHandle:
    """Starts a job as a Ray task (``ray.init()`` or RAY_ADDRESS first) and returns its handle."""

    job = job if isinstance(job, FineTuneJob) else FineTuneJob.model_validate(job)
    job_id = new_job_id()
    JobStore(job.storage_root).save(JobRecord(id=job_id, job=json.loads(job.model_dump_json())))
    ref = ray.remote(num_cpus=0, max_retries=0)(run_job).remote(job, job_id, on_success)
    return JobHandle(job_id, job.storage_root, ref)
