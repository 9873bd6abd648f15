"""RegistryService: the cluster's one writer and cache of the adapter registry (a named Ray actor).

Routers long-poll ``wait_for_change(generation)``: the call returns as soon as the
registry changes (or after a timeout), so an alias move reaches every Router within
milliseconds without polling storms. A change written by anyone else (a script, a second
cluster on the same bucket) is picked up when a long-poll times out, within 30 s.
"""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import ray

from llmaas.app.registry import BaseModelInfo, Registry, RegistryState
from llmaas.app.storage import storage_id


def actor_name(kind: str, storage_root: Path | str) -> str:
    digest = hashlib.sha256(storage_id(storage_root).encode()).hexdigest()[:10]
    return f"llmaas-{kind}-{digest}"


@ray.remote(num_cpus=0, max_restarts=-1)
class RegistryService:
    """Storage calls run in worker threads (on a bucket each is a network round trip); the event loop only answers
    snapshots and wakes long-polls."""

    def __init__(self, storage_root: str) -> None:
        self.registry = Registry(storage_root)
        self.state = self.registry.load()
        self._changed = asyncio.Event()

    async def _publish(self) -> RegistryState:
        state = await asyncio.to_thread(self.registry.load)
        if state.generation != self.state.generation:
            self.state = state
            self._changed.set()
            self._changed = asyncio.Event()
        return self.state

    async def snapshot(self) -> RegistryState:
        return self.state

    async def wait_for_change(self, generation: int, timeout_s: float = 30.0) -> RegistryState:
        if generation > self.state.generation:  # the caller saw a later registry: storage was restored
            await asyncio.to_thread(self.registry.restamp, generation)
            await self._publish()
        if self.state.generation != generation:
            return self.state
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:  # quiet here; a writer elsewhere (a script, another cluster) may not be
            await self._publish()
        return self.state

    async def register(self, name: str, src: str, base: BaseModelInfo, source: str = "",
                       metadata: dict[str, Any] | None = None, owner: str | None = None,
                       promote: bool = False) -> str:
        version_id = await asyncio.to_thread(self.registry.register, name, src, base, source, metadata, owner)
        if promote:
            await asyncio.to_thread(self.registry.promote, name, int(version_id.rsplit("@", 1)[1]))
        await self._publish()
        return version_id

    async def promote(self, name: str, version: int, canary_share: float | None = None) -> RegistryState:
        await asyncio.to_thread(self.registry.promote, name, version, canary_share)
        return await self._publish()

    async def rollback(self, name: str) -> RegistryState:
        await asyncio.to_thread(self.registry.rollback, name)
        return await self._publish()

    async def delete(self, name: str, version: int) -> RegistryState:
        await asyncio.to_thread(self.registry.delete, name, version)
        return await self._publish()

    async def reload(self) -> RegistryState:
        """Re-reads the registry from storage (after an edit outside this actor, e.g. a restore from backup)."""
        return await self._publish()


def get_registry_service(storage_root: Path | str):
    """The registry actor for this storage root, created on first use (detached: outlives any replica)."""
    return RegistryService.options(name=actor_name("registry", storage_root), namespace="llmaas",
                                   lifetime="detached", get_if_exists=True).remote(str(storage_root))
