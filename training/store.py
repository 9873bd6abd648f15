"""Job records and events, persisted atomically on the storage root (a path or an object store URI)."""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from llmaas.app.documents import VersionedDocument
from llmaas.app.storage import Storage, open_storage

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
RECORDS, EVENTS, DRILLS = "job-records", "job-events", "job-drills"  # "jobs/" holds the layout older releases wrote


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
    trained_tokens: int | None = None  # tokens x epochs
    compute_seconds: float | None = None  # training wall time x workers (what usage meters)
    owner: str | None = None  # tenant that submitted it
    cancel_requested: bool = False  # set before the job's task is stopped; the task then publishes nothing
    publishing: bool = False  # set once the job starts publishing its adapter; a cancel is then refused


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


class JobStore:
    """Job records and events on the storage root (a path or an object store URI).

    Layout: ``job-records/<job_id>/<generation>.json`` (a VersionedDocument: every update is a
    compare-and-set, so the job's task and a canceller on other nodes never lose each other's write) and
    ``job-events/<job_id>/<time_ns>-<uid>.json``, one immutable object per event, written by the driver and
    by every Ray Train worker alike.
    """

    def __init__(self, root: Storage | Path | str) -> None:
        self.storage = open_storage(root)

    def _doc(self, job_id: str) -> VersionedDocument:
        if not JOB_ID_RE.fullmatch(job_id):  # also keeps a key component under the OS's name limit
            raise ValueError(f"bad job id {job_id!r}")
        return VersionedDocument(self.storage, f"{RECORDS}/{job_id}")

    def save(self, record: JobRecord) -> None:
        self._doc(record.id).update(lambda _content: (record.model_dump_json(indent=2).encode(), None))

    def get(self, job_id: str) -> JobRecord | None:
        _generation, content = self._doc(job_id).read()
        content = content if content is not None else self._legacy(job_id, "record.json")
        return None if content is None else JobRecord.model_validate_json(content)

    def _legacy(self, job_id: str, name: str) -> bytes | None:
        """A file of the layout older releases wrote (``jobs/<id>/record.json``, ``events.jsonl``): read, so that
        their jobs stay listed after an upgrade; the first update writes the record in the new layout."""
        try:
            return self.storage.read(f"jobs/{job_id}/{name}")
        except FileNotFoundError:
            return None

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        record = self.update_if(job_id, lambda _: True, **fields)
        assert record is not None
        return record

    def update_if(self, job_id: str, condition: Callable[[JobRecord], bool], **fields: Any) -> JobRecord | None:
        """Read, check, write as one compare-and-set between processes (the job's task and a canceller). Returns
        the new record, or None when ``condition`` is false (nothing written)."""
        def change(content: bytes | None) -> tuple[bytes, JobRecord | None]:
            content = content if content is not None else self._legacy(job_id, "record.json")
            if content is None:
                raise KeyError(job_id)
            record = JobRecord.model_validate_json(content)
            if not condition(record):
                raise _Unchanged(record)
            record = record.model_copy(update=fields)
            if fields.get("status") in TERMINAL and record.finished_at is None:
                record.finished_at = int(time.time())
            return record.model_dump_json(indent=2).encode(), record

        try:
            return self._doc(job_id).update(change)
        except _Unchanged:
            return None

    def list(self) -> list[JobRecord]:
        ids = sorted({key.split("/")[1] for key in self.storage.list(RECORDS) if key.count("/") == 2} |
                     {key.split("/")[1] for key in self.storage.list("jobs") if key.endswith("/record.json")
                      and key.count("/") == 2})  # and the layout older releases wrote
        records = [self.get(job_id) for job_id in ids if JOB_ID_RE.fullmatch(job_id)]
        return sorted((r for r in records if r), key=lambda r: r.created_at, reverse=True)

    def add_event(self, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._doc(job_id)  # validates the id
        event = {"type": kind, "message": message, "data": data or {}, "created_at": int(time.time())}
        key = f"{EVENTS}/{job_id}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        self.storage.write(key, json.dumps(event).encode())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        self._doc(job_id)
        out = []
        for line in (self._legacy(job_id, "events.jsonl") or b"").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash
                continue
        for key in self.storage.list(f"{EVENTS}/{job_id}"):
            try:
                out.append(json.loads(self.storage.read(key)))
            except (FileNotFoundError, json.JSONDecodeError):  # deleted meanwhile
                continue
        return out

    def claim_once(self, job_id: str, name: str) -> bool:
        """True for exactly one caller per (job, name), across processes: e.g. a fault drill fires only once."""
        self._doc(job_id)
        return self.storage.create(f"{DRILLS}/{job_id}/{name}", b"1")


class _Unchanged(Exception):
    def __init__(self, record: JobRecord) -> None:
        self.record = record
