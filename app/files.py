"""Uploaded files (/v1/files): JSONL training data, validated line by line, stored atomically."""
from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from llmaas.app.errors import Forbidden, InvalidRequest, NotFound, PayloadTooLarge
from llmaas.app.storage import atomic_write, inside

CHUNK = 1 << 20  # uploads are copied to disk a MiB at a time


class FileObject(BaseModel):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    rows: int | None = None
    owner: str | None = None


class FileStore:
    def __init__(self, storage_root: Path | str, max_files_per_tenant: int | None = None,
                 max_bytes_per_tenant: int | None = None) -> None:
        self.root = Path(storage_root).resolve() / "files"
        self.max_files_per_tenant = max_files_per_tenant
        self.max_bytes_per_tenant = max_bytes_per_tenant
        self._owner_locks: dict[str | None, threading.Lock] = collections.defaultdict(threading.Lock)

    def _path(self, file_id: str, suffix: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum() or len(file_id) > 64:
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return inside(self.root, file_id + suffix)

    def create(self, src: BinaryIO, filename: str, purpose: str, owner: str | None = None,
               max_bytes: int | None = None) -> FileObject:
        """Streams ``src`` to disk (never whole in memory, at most ``max_bytes``), validates it line by line,
        then publishes it atomically. Blocking: the Router calls it in a worker thread."""
        from llmaas.training.data import DataError, validate_lines

        if purpose != "fine-tune":
            raise InvalidRequest("purpose must be 'fine-tune'", param="purpose")
        self._check_quota(owner, 0)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"upload exceeds {max_bytes} bytes", param="file")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            with tmp.open("rb") as f:
                try:
                    rows = validate_lines(f, filename or "upload")
                except DataError as exc:
                    raise InvalidRequest(str(exc), param="file", code="invalid_file") from None
            obj = FileObject(id=f"file-{uuid.uuid4().hex[:24]}", bytes=size, created_at=int(time.time()),
                             filename=Path(filename or "upload.jsonl").name, purpose=purpose, rows=rows, owner=owner)
            with self._owner_locks[owner]:  # one Router replica's parallel uploads cannot pass the quota together
                self._check_quota(owner, size)
                data = self._path(obj.id, ".jsonl")
                os.replace(tmp, data)
                try:
                    atomic_write(self._path(obj.id, ".json"), obj.model_dump_json())  # the file exists once this does
                except BaseException:
                    data.unlink(missing_ok=True)
                    raise
            return obj
        finally:
            tmp.unlink(missing_ok=True)

    def _check_quota(self, owner: str | None, new_bytes: int) -> None:
        """Each tenant's share of the storage: at most so many files and bytes (403 quota_exceeded above)."""
        if owner is None or (self.max_files_per_tenant is None and self.max_bytes_per_tenant is None):
            return
        mine = self.list(owner)
        if self.max_files_per_tenant is not None and len(mine) >= self.max_files_per_tenant:
            raise Forbidden(f"file quota reached: {len(mine)} of {self.max_files_per_tenant} files; delete some first",
                            param="file", code="quota_exceeded")
        used = sum(f.bytes for f in mine)
        if self.max_bytes_per_tenant is not None and used + new_bytes > self.max_bytes_per_tenant:
            raise Forbidden(f"file quota reached: {used + new_bytes} of {self.max_bytes_per_tenant} bytes; delete "
                            "some files first", param="file", code="quota_exceeded")

    def get(self, file_id: str, owner: str | None = None) -> FileObject:
        meta = self._path(file_id, ".json")
        if not meta.is_file():
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        obj = FileObject.model_validate_json(meta.read_text())
        if owner is not None and obj.owner != owner:
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return obj

    def data_path(self, file_id: str, owner: str | None = None) -> Path:
        self.get(file_id, owner)
        return self._path(file_id, ".jsonl")

    def list(self, owner: str | None = None) -> list[FileObject]:
        if not self.root.is_dir():
            return []
        objs = [FileObject.model_validate_json(p.read_text()) for p in self.root.glob("file-*.json")]
        return sorted((o for o in objs if owner is None or o.owner == owner), key=lambda o: o.created_at)

    def delete(self, file_id: str, owner: str | None = None) -> None:
        self.get(file_id, owner)
        for suffix in (".jsonl", ".json"):
            self._path(file_id, suffix).unlink(missing_ok=True)
