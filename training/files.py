"""Uploaded files (/v1/files): JSONL training data, validated line by line, stored atomically."""
from __future__ import annotations

import collections
import io
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from llmaas.app.errors import Forbidden, InvalidRequest, NotFound, PayloadTooLarge
from llmaas.app.storage import Storage, open_storage
from llmaas.training.data import DataError, validate_lines

CHUNK = 1 << 20  # uploads are copied to disk a MiB at a time
PREFIX = "files"


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
    """Uploads on the storage root: ``files/<id>.jsonl`` (the data) and ``files/<id>.json`` (its FileObject,
    written last: a file exists once its object does)."""

    def __init__(self, storage_root: Storage | Path | str, max_files_per_tenant: int | None = None,
                 max_bytes_per_tenant: int | None = None) -> None:
        self.storage = open_storage(storage_root)
        self.max_files_per_tenant = max_files_per_tenant
        self.max_bytes_per_tenant = max_bytes_per_tenant
        self._owner_locks: dict[str | None, threading.Lock] = collections.defaultdict(threading.Lock)

    @staticmethod
    def _key(file_id: str, suffix: str) -> str:
        if not file_id.startswith("file-") or not file_id[5:].isalnum() or len(file_id) > 64:
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return f"{PREFIX}/{file_id}{suffix}"

    def create(self, src: BinaryIO, filename: str, purpose: str, owner: str | None = None,
               max_bytes: int | None = None) -> FileObject:
        """Streams ``src`` to a local temp file (never whole in memory, at most ``max_bytes``; on an encrypted root
        to memory instead, so no plaintext reaches the disk), validates it line by line, then uploads it and
        publishes its object. Blocking: the Router calls it in a worker thread."""
        if purpose != "fine-tune":
            raise InvalidRequest("purpose must be 'fine-tune'", param="purpose")
        self._check_quota(owner, 0)
        with tempfile.TemporaryDirectory(prefix="llmaas-upload-") as tmp:
            local = Path(tmp) / "data.jsonl"
            size = 0
            with (io.BytesIO() if self.storage.encrypted else local.open("wb")) as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"upload exceeds {max_bytes} bytes", param="file")
                    out.write(chunk)
                data = out.getvalue() if self.storage.encrypted else None
            with (io.BytesIO(data) if data is not None else local.open("rb")) as f:
                try:
                    rows = validate_lines(f, filename or "upload")
                except DataError as exc:
                    raise InvalidRequest(str(exc), param="file", code="invalid_file") from None
            obj = FileObject(id=f"file-{uuid.uuid4().hex[:24]}", bytes=size, created_at=int(time.time()),
                             filename=Path(filename or "upload.jsonl").name, purpose=purpose, rows=rows, owner=owner)
            with self._owner_locks[owner]:  # one Router replica's parallel uploads cannot pass the quota together
                self._check_quota(owner, size)
                if data is not None:  # the data under the tenant's own data key; its object under the system key,
                    # so listing files never needs a key another tenant's deletion could have taken away
                    self.storage.for_tenant(owner).write(self._key(obj.id, ".jsonl"), data)
                else:
                    self.storage.upload_file(local, self._key(obj.id, ".jsonl"))
                try:
                    self.storage.write(self._key(obj.id, ".json"), obj.model_dump_json().encode())
                except BaseException:
                    self.storage.delete(self._key(obj.id, ".jsonl"))
                    raise
        return obj

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
        try:
            obj = FileObject.model_validate_json(self.storage.read(self._key(file_id, ".json")))
        except FileNotFoundError:
            raise NotFound(f"file {file_id!r} not found", param="file_id") from None
        if owner is not None and obj.owner != owner:
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return obj

    def data_url(self, file_id: str, owner: str | None = None) -> str:
        """Where a fine-tuning job reads the file: a path, or an s3:// / gs:// URI."""
        self.get(file_id, owner)
        return self.storage.url(self._key(file_id, ".jsonl"))

    def list(self, owner: str | None = None) -> list[FileObject]:
        objs = []
        for key in self.storage.list(PREFIX):
            if key.endswith(".json") and key.startswith(f"{PREFIX}/file-"):
                try:
                    objs.append(FileObject.model_validate_json(self.storage.read(key)))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return sorted((o for o in objs if owner is None or o.owner == owner), key=lambda o: o.created_at)

    def delete(self, file_id: str, owner: str | None = None) -> None:
        self.get(file_id, owner)
        for suffix in (".json", ".jsonl"):  # the object first: the file is gone the moment it is
            self.storage.delete(self._key(file_id, suffix))
