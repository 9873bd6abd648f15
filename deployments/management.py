"""Files, fine-tuning jobs and adapter administration: the Router's non-inference routes, free of FastAPI."""
from __future__ import annotations

import asyncio
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.errors import InvalidRequest, NotFound
from llmaas.app.protocol import cursor_page
from llmaas.app.registry import BaseModelInfo, RegistryState, check_owner, parse_model_id, validate_name
from llmaas.deployments.job_runner import RegisterOnSuccess, get_job_runner
from llmaas.deployments.registry_service import get_registry_service
from llmaas.training.api import (
    FineTuningJobObject,
    FineTuningJobRequest,
    build_job,
    checkpoints_page,
    events_page,
    job_object,
)
from llmaas.training.config import JobResources
from llmaas.training.files import FileObject, FileStore
from llmaas.training.store import JobRecord, JobStore, new_job_id


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Adapter name; the new version is name@N.")
    path: str = Field(description="A PEFT LoRA directory (safetensors only): a path the Router's node can read, "
                                  "or an s3:// / gs:// prefix; its files are copied into the storage root.")
    promote: bool = Field(False, description="Move the alias to the new version at once.")
    owner: str | None = Field(None, description="Tenant that owns it; none = shared with every tenant.")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    canary_share: float | None = Field(None, gt=0, lt=1, description="Send this share to the new version first.")


class Management:
    def __init__(self, storage_root: str, base_path: str, base_info: BaseModelInfo, base_names: tuple[str, ...],
                 max_upload_bytes: int, job_resources: JobResources | None = None, max_jobs_per_tenant: int = 2,
                 files: FileStore | None = None, metering: bool = True) -> None:
        self.storage_root = storage_root
        self.metering = metering
        self.base_path = base_path
        self.base_info = base_info
        self.base_names = base_names
        self.max_upload_bytes = max_upload_bytes
        self.job_resources = job_resources or JobResources()
        self.max_jobs_per_tenant = max_jobs_per_tenant
        self.files = files or FileStore(storage_root)
        self.jobs = JobStore(storage_root)
        self.registry = get_registry_service(storage_root)
        self.runner = get_job_runner(storage_root)

    # ----- files -----
    def upload(self, src: BinaryIO, filename: str, purpose: str, owner: str | None = None) -> FileObject:
        """Blocking (streams to disk, validates): call it off the event loop."""
        return self.files.create(src, filename, purpose, owner, self.max_upload_bytes)

    # ----- fine-tuning jobs -----
    async def create_job(self, req: FineTuningJobRequest, owner: str | None = None) -> FineTuningJobObject:
        if req.model not in self.base_names:
            raise InvalidRequest(f"fine-tuning starts from the served base model ({', '.join(self.base_names)}), "
                                 f"not {req.model!r}", param="model")
        train = await asyncio.to_thread(self.files.data_url, req.training_file, owner)
        val = await asyncio.to_thread(self.files.data_url, req.validation_file, owner) if req.validation_file else None
        job_id = new_job_id()
        job = build_job(req, self.base_path, self.storage_root, train, val, default_name=f"ft-{job_id[6:14]}",
                        resources=self.job_resources)
        # the adapter name is checked now, not after an hour of training: valid, and the tenant's to publish to
        validate_name(job.name, param="suffix")
        check_owner(await self.registry.snapshot.remote(), job.name, owner, param="suffix")
        record = JobRecord(id=job_id, job=job.model_dump(mode="json"), owner=owner,
                           api={"model": req.model, "training_file": req.training_file,
                                "validation_file": req.validation_file, "metadata": req.metadata})
        on_success = RegisterOnSuccess(self.storage_root, self.base_info, owner, self.metering)
        await self.runner.submit.remote(record, job, on_success, self.max_jobs_per_tenant)
        return job_object(record)

    def _record(self, job_id: str, owner: str | None) -> JobRecord:
        try:
            record = self.jobs.get(job_id)
        except ValueError:
            record = None
        if record is None or (owner is not None and record.owner != owner):
            raise NotFound(f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id")
        return record

    def get_job(self, job_id: str, owner: str | None = None) -> FineTuningJobObject:
        return job_object(self._record(job_id, owner))

    def list_jobs(self, limit: int, after: str | None, owner: str | None = None) -> dict[str, Any]:
        return cursor_page([job_object(r).model_dump() for r in self.jobs.list() if owner is None or r.owner == owner],
                           limit, after)

    async def cancel_job(self, job_id: str, owner: str | None = None) -> FineTuningJobObject:
        self._record(job_id, owner)
        return job_object(await self.runner.cancel.remote(job_id))

    def job_events(self, job_id: str, limit: int, after: str | None, owner: str | None = None) -> dict[str, Any]:
        self._record(job_id, owner)
        return events_page(self.jobs, job_id, limit, after)

    def job_checkpoints(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        return checkpoints_page(self.jobs, self._record(job_id, owner))

    # ----- adapters -----
    async def register_adapter(self, req: RegisterAdapterRequest) -> tuple[str, RegistryState]:
        version = await self.registry.register.remote(req.name, req.path, self.base_info, source=f"path {req.path}",
                                                      owner=req.owner, promote=req.promote)
        return version, await self.registry.snapshot.remote()

    async def promote(self, name: str, req: PromoteRequest) -> RegistryState:
        return await self.registry.promote.remote(name, req.version, req.canary_share)

    async def rollback(self, name: str) -> RegistryState:
        return await self.registry.rollback.remote(name)

    async def delete_version(self, model: str) -> RegistryState:
        name, version = parse_model_id(model)
        if version is None:
            raise InvalidRequest("delete names a version, e.g. sentiment@2", param="model")
        return await self.registry.delete.remote(name, version)

    async def watch(self, generation: int, timeout_s: float = 30.0) -> RegistryState:
        """Returns the registry as soon as it differs from ``generation`` (long poll)."""
        return await self.registry.wait_for_change.remote(generation, timeout_s)
