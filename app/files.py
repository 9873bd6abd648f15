"""Uploaded files (/v1/files): JSONL training data, validated line by line, stored atomically."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from llmaas.app.errors import InvalidRequest, NotFound
from llmaas.app.storage import atomic_write, inside


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
    def __init__(self, storage_root: Path | str) -> None:
        self.root = Path(storage_root).resolve() / "files"

    def _path(self, file_id: str, suffix: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum() or len(file_id) > 64:
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return inside(self.root, file_id + suffix)

    def create(self, data: bytes, filename: str, purpose: str, owner: str | None = None) -> FileObject:
        from llmaas.training.data import DataError, validate_bytes

        if purpose != "fine-tune":
            raise InvalidRequest("purpose must be 'fine-tune'", param="purpose")
        try:
            rows = validate_bytes(data, filename or "upload")
        except DataError as exc:
            raise InvalidRequest(str(exc), param="file", code="invalid_file") from None
        obj = FileObject(id=f"file-{uuid.uuid4().hex[:24]}", bytes=len(data), created_at=int(time.time()),
                         filename=Path(filename or "upload.jsonl").name, purpose=purpose, rows=rows, owner=owner)
        atomic_write(self._path(obj.id, ".jsonl"), data)
        atomic_write(self._path(obj.id, ".json"), obj.model_dump_json())
        return obj

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
