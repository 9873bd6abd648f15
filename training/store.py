"""Job records and events, persisted atomically under the storage root.

Layout: ``<root>/jobs/<job_id>/record.json`` (rewritten whole: temp file + fsync +
os.replace) and ``events.jsonl`` (append-only; a torn last line is skipped on read).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from llmaas.app.storage import atomic_write

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


class JobRecord(BaseModel):
    id: str
    status: JobStatus = "queued"
    job: dict[str, Any]  # the FineTuneJob
    api: dict[str, Any] = Field(default_factory=dict)  # how it was asked for over the API (file ids, metadata)
    created_at: int = Field(default_factory=lambda: int(time.time()))
    finished_at: int | None = None
    error: str | None = None
    error_code: str | None = None  # e.g. resources_unavailable, invalid_training_file, job_failed
    adapter_dir: str | None = None
    fine_tuned_model: str | None = None  # the registered version id, once registered
    metrics: dict[str, float] = Field(default_factory=dict)
    metrics_before: dict[str, float] = Field(default_factory=dict)
    eval_passed: bool | None = None
    trained_tokens: int | None = None
    owner: str | None = None  # tenant that submitted it
    cancel_requested: bool = False  # set before the job's task is stopped; the task then publishes nothing
    publishing: bool = False  # set once the job starts publishing its adapter; a cancel is then refused


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


class JobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root) / "jobs"

    def dir(self, job_id: str) -> Path:
        if not JOB_ID_RE.fullmatch(job_id):  # also keeps a path component under the OS's name limit
            raise ValueError(f"bad job id {job_id!r}")
        return self.root / job_id

    def save(self, record: JobRecord) -> None:
        atomic_write(self.dir(record.id) / "record.json", record.model_dump_json(indent=2))

    def get(self, job_id: str) -> JobRecord | None:
        path = self.dir(job_id) / "record.json"
        if not path.is_file():
            return None
        return JobRecord.model_validate_json(path.read_text())

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        record = self.update_if(job_id, lambda _: True, **fields)
        assert record is not None
        return record

    def update_if(self, job_id: str, condition: Callable[[JobRecord], bool], **fields: Any) -> JobRecord | None:
        """Read, check, write under the job's file lock: an atomic compare-and-set between processes (the job's
        task and a canceller). Returns the new record, or None when ``condition`` is false (nothing written)."""
        if not (self.dir(job_id) / "record.json").is_file():
            raise KeyError(job_id)
        with open(self.dir(job_id) / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self.get(job_id)
            if record is None:
                raise KeyError(job_id)
            if not condition(record):
                return None
            record = record.model_copy(update=fields)
            if fields.get("status") in TERMINAL and record.finished_at is None:
                record.finished_at = int(time.time())
            self.save(record)
            return record

    def list(self) -> list[JobRecord]:
        if not self.root.is_dir():
            return []
        records = [self.get(d.name) for d in self.root.iterdir() if (d / "record.json").is_file()]
        return sorted((r for r in records if r), key=lambda r: r.created_at, reverse=True)

    def events_path(self, job_id: str) -> Path:
        return self.dir(job_id) / "events.jsonl"

    def add_event(self, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        path = self.events_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"type": kind, "message": message, "data": data or {},
                                "created_at": int(time.time())}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        path = self.events_path(job_id)
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash
                continue
        return out
