"""The JobRunner actor: fine-tuning jobs run as Ray tasks it owns, outside the request path.

Records and events persist under the storage root; a runner that starts finds any job
left 'queued'/'running' by a previous life and marks it failed, so none is ever lost.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import ray

from llmaas.app.errors import NotFound, RateLimited
from llmaas.app.registry import BaseModelInfo
from llmaas.app.usage import training_record
from llmaas.deployments.registry_service import actor_name, get_registry_service
from llmaas.deployments.usage_service import get_usage_service
from llmaas.training.config import FineTuneJob
from llmaas.training.store import TERMINAL, JobRecord, JobStore


class RegisterOnSuccess:
    """Registers a finished job's adapter as a new version; promotes it when its eval passed; meters the
    training (before the job reads 'succeeded', so its usage is there once it does)."""

    def __init__(self, storage_root: str, base: BaseModelInfo, owner: str | None, metering: bool = True) -> None:
        self.storage_root = storage_root
        self.base = base
        self.owner = owner
        self.metering = metering

    def __call__(self, record: JobRecord) -> JobRecord:
        job = FineTuneJob.model_validate(record.job)
        registry = get_registry_service(self.storage_root)
        version = ray.get(registry.register.remote(job.name, record.adapter_dir, self.base, source=f"job {record.id}",
                                                   owner=self.owner, promote=bool(record.eval_passed)))
        store = JobStore(self.storage_root)
        store.add_event(record.id, "registered",
                        f"registered {version}" + (" and promoted" if record.eval_passed else
                                                   " as a candidate (eval thresholds missed)"), {"version": version})
        if self.metering:  # best effort: the adapter is registered; a ledger out of reach must not fail the job
            try:
                ray.get(get_usage_service(self.storage_root).record.remote([training_record(
                    self.owner, version, record.trained_tokens or 0, record.compute_seconds or 0.0)]), timeout=60)
            except Exception as exc:
                store.add_event(record.id, "warning", f"training usage not metered: {type(exc).__name__}: {exc}")
        return store.update(record.id, fine_tuned_model=version)


def _run_job_task(job_json: str, job_id: str, on_success: RegisterOnSuccess) -> str:
    # here, not at the top: training.jobs brings Ray Train and peft (~4 s of imports on 2 cores), which
    # every Router replica (it imports this module for the handle) and the runner actor would pay at start
    from llmaas.training.jobs import run_job

    return run_job(FineTuneJob.model_validate_json(job_json), job_id, on_success).status


def _cancel_job(store: JobStore, job_id: str, ref: ray.ObjectRef | None) -> JobRecord:
    from llmaas.training.jobs import cancel_job  # heavy (see _run_job_task): here, on the thread, off the loop

    return cancel_job(store, job_id, ref)


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
        return await asyncio.to_thread(_cancel_job, self.store, job_id, self.refs.pop(job_id, None))

    def running(self) -> list[str]:
        ready, _ = ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=0) if self.refs else ([], [])
        done = set(ready)
        return [job_id for job_id, ref in self.refs.items() if ref not in done]


def get_job_runner(storage_root: Path | str):
    return JobRunner.options(name=actor_name("jobs", storage_root), namespace="llmaas", lifetime="detached",
                             get_if_exists=True).remote(str(storage_root))
