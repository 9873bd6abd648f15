"""Fine-tuning over the OpenAI API: request and response shapes, and the request -> FineTuneJob translation.

The JobRunner actor that runs the jobs is a deployment-level piece (llmaas.deployments.job_runner).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmaas.app.errors import InvalidRequest
from llmaas.app.names import BASE_ALIAS
from llmaas.app.protocol import cursor_page
from llmaas.app.storage import relative_key
from llmaas.training.config import FineTuneJob, JobResources
from llmaas.training.store import JobRecord, JobStore

BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier scales this


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """OpenAI's current way to say how to fine-tune: ``{"type": "supervised", "supervised": {...}}``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base model ('base' or its served name).")
    training_file: str = Field(description="A file id from /v1/files.")
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Older spelling of method.supervised's.")
    method: Method | None = None
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
    method: dict[str, Any]
    seed: int
    error: JobErrorInfo | None
    metadata: dict[str, str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # extension: eval on the validation set
    metrics_before: dict[str, float] = Field(default_factory=dict)  # extension: the base model's scores
    eval_passed: bool | None = None


def job_object(record: JobRecord) -> FineTuningJobObject:
    j, api = record.job, record.api
    hyperparameters = {"n_epochs": j["epochs"], "batch_size": j["batch_size"],
                       "learning_rate_multiplier": j["learning_rate"] / BASE_LEARNING_RATE}
    return FineTuningJobObject(
        id=record.id, created_at=record.created_at, finished_at=record.finished_at,
        model=api.get("model", j.get("base_model", BASE_ALIAS)), fine_tuned_model=record.fine_tuned_model,
        status=record.status, trained_tokens=record.trained_tokens,
        training_file=api.get("training_file", ""), validation_file=api.get("validation_file"),
        hyperparameters=hyperparameters,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        seed=j["seed"],
        error=JobErrorInfo(code=record.error_code or "job_failed", message=record.error) if record.error else None,
        metadata=api.get("metadata"), metrics=record.metrics, metrics_before=record.metrics_before,
        eval_passed=record.eval_passed)


def requested_hyperparameters(req: FineTuningJobRequest) -> tuple[Hyperparameters, str]:
    """The request's hyperparameters and where they were given (``method.supervised`` or the older top level)."""
    if req.method is None:
        return req.hyperparameters or Hyperparameters(), "hyperparameters"
    if req.method.type != "supervised":
        raise InvalidRequest(f"method {req.method.type!r} is not supported; only 'supervised' is",
                             param="method.type")
    given = req.method.supervised.hyperparameters if req.method.supervised else None
    if given is not None and req.hyperparameters is not None:
        raise InvalidRequest("give hyperparameters in method.supervised or at the top level, not both",
                             param="method")
    if given is None:
        return req.hyperparameters or Hyperparameters(), "hyperparameters"
    return given, "method.supervised.hyperparameters"


def build_job(req: FineTuningJobRequest, base_path: str, storage_root: str, train_path: str,
              val_path: str | None, default_name: str, resources: JobResources) -> FineTuneJob:
    """OpenAI request -> FineTuneJob with the operator's ``resources``; any invalid field is a 400 naming it."""
    hp, hp_param = requested_hyperparameters(req)
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
        param = {"name": "suffix", "epochs": f"{hp_param}.n_epochs", "batch_size": f"{hp_param}.batch_size",
                 "learning_rate": f"{hp_param}.learning_rate_multiplier"}.get(where, f"llmaas.{where}")
        raise InvalidRequest(f"{param}: {first['msg']}", param=param) from None


def events_page(store: JobStore, job_id: str, limit: int, after: str | None) -> dict[str, Any]:
    events = [{"id": f"ftevent-{job_id[6:]}-{i}", "object": "fine_tuning.job.event", "created_at": e["created_at"],
               "level": "error" if e["type"] == "error" else "info", "message": e["message"], "type": e["type"],
               "data": e.get("data", {})} for i, e in enumerate(store.events(job_id))]
    events.reverse()  # newest first, as OpenAI lists them
    return cursor_page(events, limit, after)


def checkpoints_page(store: JobStore, record: JobRecord) -> dict[str, Any]:
    data = []
    if record.adapter_dir and record.fine_tuned_model:
        key = relative_key(store.storage, record.adapter_dir)
        try:
            meta = json.loads(store.storage.read(f"{key}/metadata.json")) if key else {}
        except FileNotFoundError:
            meta = {}
        data.append({"id": f"ftckpt-{record.id[6:]}", "object": "fine_tuning.job.checkpoint",
                     "created_at": record.finished_at or record.created_at,
                     "fine_tuned_model_checkpoint": record.fine_tuned_model, "fine_tuning_job_id": record.id,
                     "step_number": meta.get("global_step", 0),
                     "metrics": {"full_valid_loss": record.metrics.get("loss")}})
    return {"object": "list", "data": data, "has_more": False}
