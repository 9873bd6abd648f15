"""RegistryService: the cluster's one writer and cache of the adapter registry (a named Ray actor).

Routers long-poll ``wait_for_change(generation)``: the call returns as soon as the
registry changes (or after a timeout), so an alias move reaches every Router within
milliseconds without polling storms.
"""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import ray

from llmaas.app.registry import BaseModelInfo, Registry, RegistryState


def actor_name(kind: str, storage_root: Path | str) -> str:
    digest = hashlib.sha256(str(Path(storage_root).resolve()).encode()).hexdigest()[:10]
    return f"llmaas-{kind}-{digest}"


@ray.remote(num_cpus=0, max_restarts=-1)
class RegistryService:
    def __init__(self, storage_root: str) -> None:
        self.registry = Registry(storage_root)
        self.state = self.registry.load()
        self._changed = asyncio.Event()

    def _publish(self) -> RegistryState:
        self.state = self.registry.load()
        self._changed.set()
        self._changed = asyncio.Event()
        return self.state

    async def snapshot(self) -> RegistryState:
        return self.state

    async def wait_for_change(self, generation: int, timeout_s: float = 30.0) -> RegistryState:
        if generation > self.state.generation:  # the caller saw a later registry: the file was restored
            self.registry.restamp(generation)
            self._publish()
        if self.state.generation != generation:
            return self.state
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return self.state

    async def register(self, name: str, src: str, base: BaseModelInfo, source: str = "",
                       metadata: dict[str, Any] | None = None, owner: str | None = None,
                       promote: bool = False) -> str:
        version_id = self.registry.register(name, src, base, source, metadata, owner)
        if promote:
            self.registry.promote(name, int(version_id.rsplit("@", 1)[1]))
        self._publish()
        return version_id

    async def promote(self, name: str, version: int, canary_share: float | None = None) -> RegistryState:
        self.registry.promote(name, version, canary_share)
        return self._publish()

    async def rollback(self, name: str) -> RegistryState:
        self.registry.rollback(name)
        return self._publish()

    async def delete(self, name: str, version: int) -> RegistryState:
        self.registry.delete(name, version)
        return self._publish()

    async def reload(self) -> RegistryState:
        """Re-reads registry.json (after an offline edit by the CLI)."""
        return self._publish()


def get_registry_service(storage_root: Path | str):
    """The registry actor for this storage root, created on first use (detached: outlives any replica)."""
    return RegistryService.options(name=actor_name("registry", storage_root), namespace="llmaas",
                                   lifetime="detached", get_if_exists=True).remote(str(storage_root))
