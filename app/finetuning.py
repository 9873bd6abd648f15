"""Fine-tuning over the OpenAI API: request/response shapes and the JobRunner actor.

Jobs run as Ray tasks owned by a detached JobRunner actor, outside the request path.
Records and events persist under the storage root; a runner that starts finds any job
left 'queued'/'running' by a previous life and marks it failed, so none is ever lost.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.errors import InvalidRequest, NotFound, RateLimited
from llmaas.app.registry import BaseModelInfo
from llmaas.app.registry_service import actor_name, get_registry_service
from llmaas.training.config import FineTuneJob, JobResources
from llmaas.training.jobs import cancel_job
from llmaas.training.store import TERMINAL, JobRecord, JobStore

BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier scales this


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base model ('base' or its served name).")
    training_file: str = Field(description="A file id from /v1/files.")
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(None, description="Adapter name the result is registered under.")
    seed: int | None = None
    metadata: dict[str, str] | None = None
    llmaas: dict[str, Any] | None = Field(
        None, description="Extension: FineTuneJob fields (lora, eval with thresholds, max_length, ...); cluster "
                          "resources are the operator's (serve_config.yaml args.finetuning).")


class JobErrorInfo(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str = "llmaas"
    result_files: list[str] = Field(default_factory=list)
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    seed: int
    error: JobErrorInfo | None
    metadata: dict[str, str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # extension: eval on the validation set
    metrics_before: dict[str, float] = Field(default_factory=dict)  # extension: the base model's scores
    eval_passed: bool | None = None


def job_object(record: JobRecord) -> FineTuningJobObject:
    j, api = record.job, record.api
    return FineTuningJobObject(
        id=record.id, created_at=record.created_at, finished_at=record.finished_at,
        model=api.get("model", j.get("base_model", "base")), fine_tuned_model=record.fine_tuned_model,
        status=record.status, trained_tokens=record.trained_tokens,
        training_file=api.get("training_file", ""), validation_file=api.get("validation_file"),
        hyperparameters={"n_epochs": j["epochs"], "batch_size": j["batch_size"],
                         "learning_rate_multiplier": j["learning_rate"] / BASE_LEARNING_RATE},
        seed=j["seed"],
        error=JobErrorInfo(code=record.error_code or "job_failed", message=record.error) if record.error else None,
        metadata=api.get("metadata"), metrics=record.metrics, metrics_before=record.metrics_before,
        eval_passed=record.eval_passed)


def build_job(req: FineTuningJobRequest, base_path: str, storage_root: Path, train_path: Path,
              val_path: Path | None, default_name: str, resources: JobResources) -> FineTuneJob:
    """OpenAI request -> FineTuneJob with the operator's ``resources``; any invalid field is a 400 naming it."""
    from pydantic import ValidationError

    hp = req.hyperparameters or Hyperparameters()
    raw: dict[str, Any] = {"name": req.suffix or default_name, "base_model": base_path,
                           "train_files": [str(train_path)], "storage_root": str(storage_root)}
    if val_path is not None:
        raw["validation_file"] = str(val_path)
    if hp.n_epochs != "auto":
        raw["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        raw["batch_size"] = hp.batch_size
    if hp.learning_rate_multiplier != "auto":
        raw["learning_rate"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
    if req.seed is not None:
        raw["seed"] = req.seed
    overrides = dict(req.llmaas or {})
    for key in ("base_model", "train_files", "validation_file", "storage_root", "cache_dir"):
        if key in overrides:
            raise InvalidRequest(f"llmaas.{key} cannot be set over the API", param=f"llmaas.{key}")
    for key in JobResources.model_fields:
        if key in overrides:
            raise InvalidRequest(f"llmaas.{key} is the operator's to set (serve_config.yaml args.finetuning)",
                                 param=f"llmaas.{key}")
    raw.update(overrides)
    raw.update(resources.model_dump())
    try:
        return FineTuneJob.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        param = {"name": "suffix", "epochs": "hyperparameters.n_epochs", "batch_size": "hyperparameters.batch_size",
                 "learning_rate": "hyperparameters.learning_rate_multiplier"}.get(where, f"llmaas.{where}")
        raise InvalidRequest(f"{param}: {first['msg']}", param=param) from None


class RegisterOnSuccess:
    """Registers a finished job's adapter as a new version; promotes it when its eval passed."""

    def __init__(self, storage_root: str, base: BaseModelInfo, owner: str | None) -> None:
        self.storage_root = storage_root
        self.base = base
        self.owner = owner

    def __call__(self, record: JobRecord) -> JobRecord:
        job = FineTuneJob.model_validate(record.job)
        registry = get_registry_service(self.storage_root)
        version = ray.get(registry.register.remote(job.name, record.adapter_dir, self.base, source=f"job {record.id}",
                                                   owner=self.owner, promote=bool(record.eval_passed)))
        store = JobStore(self.storage_root)
        store.add_event(record.id, "registered",
                        f"registered {version}" + (" and promoted" if record.eval_passed else
                                                   " as a candidate (eval thresholds missed)"), {"version": version})
        return store.update(record.id, fine_tuned_model=version)


def _run_job_task(job_json: str, job_id: str, on_success: RegisterOnSuccess) -> str:
    from llmaas.training.jobs import run_job

    return run_job(FineTuneJob.model_validate_json(job_json), job_id, on_success).status


@ray.remote(num_cpus=0, max_restarts=-1)
class JobRunner:
    def __init__(self, storage_root: str) -> None:
        self.storage_root = storage_root
        self.store = JobStore(storage_root)
        self.refs: dict[str, ray.ObjectRef] = {}
        for record in self.store.list():  # jobs a previous runner left unfinished
            if record.status not in TERMINAL:
                self.store.add_event(record.id, "error", "the service restarted while this job was pending")
                self.store.update(record.id, status="failed", error="interrupted: the job runner restarted")

    def submit(self, record: JobRecord, job: FineTuneJob, on_success: RegisterOnSuccess,
               max_active: int | None = None) -> JobRecord:
        """Queues a job. The per-tenant cap is checked here, in the one runner actor, so the count and the new
        record are one step: a burst of concurrent creates cannot pass it together."""
        if max_active is not None:
            active = [r for r in self.store.list() if r.owner == record.owner and r.status not in TERMINAL]
            if len(active) >= max_active:  # fine-tuning cannot take the cluster
                raise RateLimited(f"{len(active)} fine-tuning jobs are already queued or running (at most "
                                  f"{max_active} at once); retry when one finishes", retry_after_s=60.0,
                                  param="model", code="too_many_jobs")
        self.store.save(record)
        self.store.add_event(record.id, "status", "job queued")
        task = ray.remote(num_cpus=0, max_retries=0)(_run_job_task)
        self.refs[record.id] = task.remote(job.model_dump_json(), record.id, on_success)
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        if self.store.get(job_id) is None:
            raise NotFound(f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id")
        # a thread: the graceful stop waits for the task, and the runner keeps answering meanwhile
        return await asyncio.to_thread(cancel_job, self.store, job_id, self.refs.pop(job_id, None))

    def running(self) -> list[str]:
        ready, _ = ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=0) if self.refs else ([], [])
        done = set(ready)
        return [job_id for job_id, ref in self.refs.items() if ref not in done]


def get_job_runner(storage_root: Path | str):
    return JobRunner.options(name=actor_name("jobs", storage_root), namespace="llmaas", lifetime="detached",
                             get_if_exists=True).remote(str(storage_root))


def events_page(store: JobStore, job_id: str, limit: int, after: str | None) -> dict[str, Any]:
    events = [{"id": f"ftevent-{job_id[6:]}-{i}", "object": "fine_tuning.job.event", "created_at": e["created_at"],
               "level": "error" if e["type"] == "error" else "info", "message": e["message"], "type": e["type"],
               "data": e.get("data", {})} for i, e in enumerate(store.events(job_id))]
    events.reverse()  # newest first, as OpenAI lists them
    if after is not None:
        ids = [e["id"] for e in events]
        events = events[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}


def checkpoints_page(record: JobRecord) -> dict[str, Any]:
    data = []
    if record.adapter_dir and record.fine_tuned_model:
        meta_file = Path(record.adapter_dir) / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        data.append({"id": f"ftckpt-{record.id[6:]}", "object": "fine_tuning.job.checkpoint",
                     "created_at": record.finished_at or record.created_at,
                     "fine_tuned_model_checkpoint": record.fine_tuned_model, "fine_tuning_job_id": record.id,
                     "step_number": meta.get("global_step", 0),
                     "metrics": {"full_valid_loss": record.metrics.get("loss")}})
    return {"object": "list", "data": data, "has_more": False}
