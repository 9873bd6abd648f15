"""AccessService: runtime API keys and the audit log (a named Ray actor), and the Router's side of it.

Routers long-poll ``wait_for_change(generation)`` as they do the registry's, so a key created or revoked
reaches every Router within milliseconds (a revoked key is refused from the next request on). Audit events
are written by the actor in a worker thread; a Router submits them and, for admin actions, waits.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import ray

from llmaas.app.access import AuditEvent, AuditLog, CreateKeyRequest, KeyRecord, KeyState, KeyStore
from llmaas.app.auth import Authenticator, Principal
from llmaas.deployments.long_poll import LongPoll
from llmaas.deployments.registry_service import actor_name

logger = logging.getLogger("ray.serve")

AUDIT_TIMEOUT_S = 10.0
REFUSALS_PER_MINUTE = 60  # refused-key events one Router writes per minute; past it they are counted, not written


@ray.remote(num_cpus=0, max_restarts=-1)
class AccessService:
    def __init__(self, storage_root: str) -> None:
        self.keys = KeyStore(storage_root)
        self.audit_log = AuditLog(storage_root)
        self.state = self.keys.load()
        self._changed = asyncio.Event()

    def _publish(self, state: KeyState) -> None:
        if state.generation > self.state.generation:  # a slower, older load landing late changes nothing
            self.state = state
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_for_change(self, generation: int, timeout_s: float = 30.0) -> KeyState:
        if self.state.generation == generation:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:  # quiet: a writer elsewhere (another cluster on the root) may not be
                self._publish(await asyncio.to_thread(self.keys.load))
        return self.state

    async def create(self, request: CreateKeyRequest, who: Principal) -> tuple[KeyRecord, str]:
        record, secret = await asyncio.to_thread(self.keys.create, request, who.tenant)
        await self._reload()
        await self.audit("key.create", who.tenant, who.key_id, record.id,
                         detail={"tenant": record.tenant, "admin": record.admin})
        return record, secret

    async def revoke(self, key_id: str, who: Principal) -> KeyRecord:
        record = await asyncio.to_thread(self.keys.revoke, key_id)
        await self._reload()
        await self.audit("key.revoke", who.tenant, who.key_id, key_id, detail={"tenant": record.tenant})
        return record

    async def _reload(self) -> None:
        """After a write: the new state out to every Router. A failed read leaves it to the next long-poll timeout;
        the write is done and its answer (a new key's only copy of the secret) must reach the caller."""
        try:
            self._publish(await asyncio.to_thread(self.keys.load))
        except Exception:
            logger.exception("access keys: reload after a write failed")

    async def list_keys(self) -> list[KeyRecord]:
        return list(self.state.keys)

    async def audit(self, action: str, actor: str | None, key_id: str | None = None, target: str | None = None,
                    outcome: str = "ok", detail: dict[str, Any] | None = None) -> None:
        try:
            await asyncio.to_thread(self.audit_log.append, action, actor, key_id, target, outcome, detail)
        except Exception:  # the log is best effort against a storage outage; the action itself is done
            logger.exception("audit event %s on %s not written", action, target)

    async def read_audit(self, start: float | None, end: float | None, limit: int,
                         action: str | None = None) -> list[AuditEvent]:
        return await asyncio.to_thread(self.audit_log.read, start, end, limit, action)


def get_access_service(storage_root: Path | str):
    return AccessService.options(name=actor_name("access", storage_root), namespace="llmaas", lifetime="detached",
                                 get_if_exists=True).remote(str(storage_root))


class AccessClient:
    """A Router's view: keeps its Authenticator's runtime keys current and writes audit events."""

    def __init__(self, storage_root: str, auth: Authenticator) -> None:
        self.service = get_access_service(storage_root)
        self.auth = auth
        self._poll = LongPoll("access keys", lambda: self.service.wait_for_change.remote(-1, 0),
                              lambda: self.service.wait_for_change.remote(self.auth.runtime_generation), self._apply)
        self._minute, self._refusals, self._suppressed = 0, 0, 0

    async def ensure_watching(self) -> None:
        """The first call loads the runtime keys; after it a long poll applies every change."""
        await self._poll.ensure()

    def _apply(self, state: KeyState) -> bool:
        if state.generation < self.auth.runtime_generation:
            return False
        self.auth.set_runtime_keys(state.generation, [(k.digest, k.tenant, k.admin, k.id) for k in state.active()])
        return True

    async def admin_action(self, action: str, who: Principal, target: str, detail: dict[str, Any] | None = None
                           ) -> None:
        """Best effort: the action is done; an audit log that cannot be reached is logged, not the client's error."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.service.audit.remote(
                action, who.tenant, who.key_id, target, "ok", detail).future()), AUDIT_TIMEOUT_S)
        except Exception as exc:
            logger.error("audit event %s on %s not confirmed: %s", action, target, exc)

    def refused(self, what: str, reason: str, actor: str | None, client: str | None = None) -> None:
        """A key refused (401) or an admin route refused (403): written, up to REFUSALS_PER_MINUTE per Router."""
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute, self._refusals = minute, 0
        self._refusals += 1
        if self._refusals > REFUSALS_PER_MINUTE:
            self._suppressed += 1
            return
        detail: dict[str, Any] = {"client": client} if client else {}
        if self._suppressed:
            detail["suppressed_before"] = self._suppressed  # refusals past the cap, not written one by one
            self._suppressed = 0
        self.service.audit.remote("auth.refused", actor, None, what, reason, detail)
