"""API keys, tenants and the admin role.

Keys come from config (``auth.api_keys``) or a secret file (``auth.api_keys_file``,
YAML/JSON: a list of {key, tenant, admin}), and, once auth is on, from admins at runtime
(app/access.py; revoked at runtime too). Only sha256 digests are kept, compared
with ``hmac.compare_digest``. With no keys configured every request is accepted
(local default; the proxy binds to 127.0.0.1).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.errors import Forbidden, Unauthorized
from llmaas.app.names import NAME_PATTERN


class APIKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=16, description="The bearer secret (16+ characters).")
    tenant: str = Field(pattern=NAME_PATTERN, description="Who owns what this key creates.")
    admin: bool = Field(False, description="May register, promote, roll back and delete adapters.")


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_keys: list[APIKey] = Field(default_factory=list, description="Inline keys (prefer api_keys_file).")
    api_keys_file: Path | None = Field(None, description="YAML/JSON list of {key, tenant, admin}.")

    def load_keys(self) -> list[APIKey]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            raw = yaml.safe_load(Path(self.api_keys_file).read_text()) or []
            keys += [APIKey.model_validate(k) for k in raw]
        return keys


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: auth is off, everything is visible
    admin: bool
    key_id: str | None = None  # a runtime key's id (config keys have none)


ANONYMOUS = Principal(tenant=None, admin=True)


def key_digest(secret: str) -> bytes:
    """What is kept of a key: its sha256 (config keys in memory, runtime keys on storage as hex)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    def __init__(self, keys: list[APIKey]) -> None:
        self._config = [(key_digest(k.key), Principal(k.tenant, k.admin)) for k in keys]
        self._keys = list(self._config)
        self.runtime_generation = 0  # of the runtime key set last applied

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def set_runtime_keys(self, generation: int, keys: list[tuple[str, str, bool, str]]) -> None:
        """The active runtime keys, (hex digest, tenant, admin, key id) each, replacing the previous set: a key
        revoked is refused from the next request on."""
        if generation < self.runtime_generation:
            return  # a late answer of an older poll
        self.runtime_generation = generation
        self._keys = self._config + [(bytes.fromhex(d), Principal(t, a, i)) for d, t, a, i in keys]

    def authenticate(self, authorization: str | None) -> Principal:
        if not self._keys:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        presented = key_digest(authorization[7:].strip())
        found = None
        for digest, principal in self._keys:  # compare against every key: timing says nothing about which
            if hmac.compare_digest(digest, presented):
                found = principal
        if found is None:
            raise Unauthorized("incorrect API key provided", code="invalid_api_key")
        return found


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("this operation needs an admin API key", code="admin_required")
