"""API keys made at runtime, and the audit log of admin actions and refused keys: on storage, free of Ray.

Keys an admin creates over the API live in a VersionedDocument (``access-keys/<generation>.json``) as
sha256 digests only: the secret is shown once, in the answer to its creation, and never stored. A revoked
key stays listed (with ``revoked_at``) so the audit trail can name it. Keys from the config file
(``auth.api_keys_file``) sit beside these; they change with the config, not at runtime.

The audit log is append-only: one immutable object per event, ``audit/<day>/<time ns>-<uid>.json``,
created with the storage's create-only write, so nothing rewrites or loses an earlier event.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.auth import key_digest
from llmaas.app.documents import VersionedDocument
from llmaas.app.errors import NotFound
from llmaas.app.names import NAME_PATTERN
from llmaas.app.storage import Storage, open_storage

KEYS_PREFIX = "access-keys"
AUDIT_PREFIX = "audit"
SECRET_PREFIX = "sk-llmaas-"


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=NAME_PATTERN, description="Who the key acts for.")
    admin: bool = Field(False, description="May manage adapters, keys and read everyone's usage and the audit log.")
    name: str | None = Field(None, max_length=200, description="A label for people (e.g. 'ci pipeline').")


class KeyRecord(BaseModel):
    id: str
    object: str = "api_key"
    tenant: str
    admin: bool = False
    name: str | None = None
    digest: str = Field(exclude=True)  # never leaves the service
    redacted: str  # the secret's last four characters, for people to tell keys apart
    created_at: int
    created_by: str | None = None
    revoked_at: int | None = None


class KeyState(BaseModel):
    generation: int = 0
    keys: list[KeyRecord] = Field(default_factory=list)

    def active(self) -> list[KeyRecord]:
        return [k for k in self.keys if k.revoked_at is None]


def _dump(state: KeyState) -> bytes:
    return json.dumps({"keys": [k.model_dump() | {"digest": k.digest} for k in state.keys]}).encode()


class KeyStore:
    def __init__(self, storage: Storage | str) -> None:
        self.storage = open_storage(storage)
        self.doc = VersionedDocument(self.storage, KEYS_PREFIX)

    def load(self) -> KeyState:
        generation, content = self.doc.read()
        if content is None:
            return KeyState()
        return KeyState(generation=generation, keys=[KeyRecord(**k) for k in json.loads(content)["keys"]])

    def _change(self, change) -> Any:
        def apply(content: bytes | None):
            keys = [KeyRecord(**k) for k in json.loads(content)["keys"]] if content else []
            state = KeyState(keys=keys)
            result = change(state)
            return _dump(state), result
        return self.doc.update(apply)

    def create(self, request: CreateKeyRequest, created_by: str | None) -> tuple[KeyRecord, str]:
        """A new key: (its record, the secret, which exists nowhere else)."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(id=f"key-{uuid.uuid4().hex[:16]}", tenant=request.tenant, admin=request.admin,
                           name=request.name, digest=key_digest(secret).hex(), redacted="..." + secret[-4:],
                           created_at=int(time.time()), created_by=created_by)

        def add(state: KeyState) -> KeyRecord:
            state.keys.append(record)
            return record

        return self._change(add), secret

    def revoke(self, key_id: str) -> KeyRecord:
        def revoke(state: KeyState) -> KeyRecord:
            for k in state.keys:
                if k.id == key_id:
                    if k.revoked_at is None:
                        k.revoked_at = int(time.time())
                    return k
            raise NotFound(f"API key {key_id!r} not found", param="key_id", code="key_not_found")

        return self._change(revoke)


class AuditEvent(BaseModel):
    id: str
    object: str = "audit.event"
    created_at: float
    action: str  # key.create, key.revoke, adapter.register / promote / rollback / delete, auth.refused, ...
    actor: str | None  # the acting tenant (None: no key, auth off)
    key_id: str | None = None  # the acting key, when it is a runtime one
    target: str | None = None  # what it acted on: a key id, an adapter version
    outcome: str = "ok"  # ok, or why it was refused
    detail: dict[str, Any] = Field(default_factory=dict)


class AuditLog:
    def __init__(self, storage: Storage | str) -> None:
        self.storage = open_storage(storage)

    def append(self, action: str, actor: str | None, key_id: str | None = None, target: str | None = None,
               outcome: str = "ok", detail: dict[str, Any] | None = None) -> AuditEvent:
        now = time.time()
        day = _day(now)
        event = AuditEvent(id=f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}", created_at=now, action=action,
                           actor=actor, key_id=key_id, target=target, outcome=outcome, detail=detail or {})
        self.storage.create(f"{AUDIT_PREFIX}/{day}/{event.id}.json", event.model_dump_json().encode())
        return event

    def read(self, start: float | None = None, end: float | None = None, limit: int = 100,
             action: str | None = None) -> list[AuditEvent]:
        """Events with ``start <= created_at < end`` (and an action starting with ``action``: 'key.' for every key
        event), newest first, at most ``limit``."""
        out: list[AuditEvent] = []
        for day in sorted(self._days(), reverse=True):
            if start is not None and day < _day(start) or end is not None and day > _day(end):
                continue
            for key in sorted(self.storage.list(f"{AUDIT_PREFIX}/{day}"), reverse=True):
                event = AuditEvent.model_validate_json(self.storage.read(key))
                if (start is None or event.created_at >= start) and (end is None or event.created_at < end) and \
                        (action is None or event.action.startswith(action)):
                    out.append(event)
                    if len(out) >= limit:
                        return out
        return out

    def _days(self) -> set[str]:
        return {key.split("/")[1] for key in self.storage.list(AUDIT_PREFIX) if key.count("/") == 2}


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")
