"""Adapter registry: name -> immutable versions, an alias per name, optional canary split.

Persisted as ``<storage_root>/registry.json`` (read-modify-write under a file lock,
then temp file + fsync + os.replace), so a crash never leaves a half-written
registry and several processes can share one storage root. Adapter files are copied
into ``<storage_root>/adapters/<name>/<version>/`` once and never change.
"""
from __future__ import annotations

import fcntl
import json
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llmaas.app.errors import InvalidRequest, NotFound
from llmaas.app.storage import atomic_write

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9\-_.]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "metadata.json")
RESERVED = {"base"}


class Conflict(InvalidRequest):
    """A registry operation that contradicts its state (e.g. deleting the alias target)."""

    status_code = 409


class AdapterVersion(BaseModel):
    version: int
    path: str  # relative to the storage root
    created_at: int = Field(default_factory=lambda: int(time.time()))
    source: str = ""  # "job ftjob-…" or "path …"
    rank: int
    metadata: dict[str, Any] = Field(default_factory=dict)


class AdapterEntry(BaseModel):
    name: str
    versions: dict[int, AdapterVersion] = Field(default_factory=dict)
    alias: int | None = None  # the version `name` resolves to
    canary: dict[int, float] | None = None  # version -> traffic share (sums to 1) while a canary runs
    alias_history: list[int] = Field(default_factory=list)  # previous alias targets, for rollback
    next_version: int = 1
    owner: str | None = None


class RegistryState(BaseModel):
    generation: int = 0  # bumps on every change; watchers long-poll on it
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class BaseModelInfo:
    """What an adapter must fit: the served base model and the engine's LoRA limits."""

    fingerprint: str
    max_rank: int
    projection_shapes: dict[str, tuple[int, int]]  # module -> (in, out)
    num_layers: int


def parse_model_id(model: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3). Validates the name."""
    name, sep, ver = model.partition("@")
    if not NAME_RE.match(name):
        raise NotFound(f"model {model!r} not found", param="model", code="model_not_found")
    if sep:
        if not ver.isdigit():
            raise NotFound(f"model {model!r} not found: versions look like {name}@1", param="model",
                           code="model_not_found")
        return name, int(ver)
    return name, None


def validate_name(name: str, param: str = "name") -> str:
    if not NAME_RE.match(name) or name in RESERVED:
        raise InvalidRequest(f"adapter name {name!r} is invalid: use [a-z0-9][a-z0-9-_.]{{0,63}}, not 'base'",
                             param=param)
    return name


def check_adapter(src: Path, base: BaseModelInfo) -> int:
    """Validates a PEFT LoRA dir against the base model; returns its rank. Never unpickles anything."""
    from llmaas.deployments.engine.lora import AdapterError, check_fits, load_peft_adapter

    try:
        adapter = load_peft_adapter(src, "check", base.num_layers, base.max_rank)
        check_fits(adapter, base.projection_shapes, src)
    except (AdapterError, KeyError, ValueError, OSError) as exc:
        raise InvalidRequest(f"adapter rejected: {exc}", param="path") from None
    meta_file = src / "metadata.json"
    if meta_file.is_file():
        fp = json.loads(meta_file.read_text()).get("base_fingerprint")
        if fp and fp != base.fingerprint:
            raise InvalidRequest("adapter rejected: its metadata names a different base model fingerprint",
                                 param="path", code="base_model_mismatch")
    return adapter.rank


def check_owner(state: RegistryState, name: str, owner: str | None, param: str = "name") -> None:
    """A tenant (``owner``) may add versions only to names it owns or new ones, never to another tenant's or a
    shared name (whose alias a promotion would move for everyone). ``owner`` None is the operator: any name."""
    entry = state.adapters.get(name)
    if owner is not None and entry is not None and entry.owner != owner:
        raise NotFound(f"model {name!r} not found", param=param, code="model_not_found")  # names do not leak


class Registry:
    def __init__(self, storage_root: Path | str) -> None:
        self.root = Path(storage_root).resolve()
        self.file = self.root / "registry.json"
        self.root.mkdir(parents=True, exist_ok=True)

    # ----- persistence -----
    def load(self) -> RegistryState:
        if not self.file.is_file():
            return RegistryState()
        return RegistryState.model_validate_json(self.file.read_text())

    @contextmanager
    def _edit(self):
        with open(self.root / ".registry.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.load()
            yield state
            state.generation += 1
            atomic_write(self.file, state.model_dump_json(indent=2))

    def restamp(self, above: int) -> None:
        """Moves the generation past ``above``: after a registry file is restored from a backup its generation is
        older than what Routers have seen, and generations must only grow for them to take the new state."""
        with self._edit() as state:
            state.generation = max(state.generation, above)  # _edit adds one

    def adapter_dir(self, name: str, version: int) -> Path:
        """The version's directory, guaranteed to resolve inside the storage root."""
        validate_name(name)
        path = (self.root / "adapters" / name / str(int(version))).resolve()
        if not path.is_relative_to(self.root / "adapters"):
            raise InvalidRequest(f"adapter path for {name}@{version} escapes the storage root", param="model")
        return path

    # ----- operations -----
    def register(self, name: str, src: Path | str, base: BaseModelInfo, source: str = "",
                 metadata: dict[str, Any] | None = None, owner: str | None = None) -> str:
        """Copies a PEFT LoRA dir in as the next version of ``name``; returns 'name@v'."""
        validate_name(name)
        src = Path(src)
        check_adapter(src, base)  # the source, for a clear 400 (missing files, pickle, shapes) before any copy
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            # Then copy, and validate the copy again: what is published is exactly what was checked.
            for f in ADAPTER_FILES[:2]:
                shutil.copyfile(src / f, staging / f)  # copies content: a symlink in src cannot leak out
            meta = dict(metadata or {})
            if (src / "metadata.json").is_file():
                meta = {**json.loads((src / "metadata.json").read_text()), **meta}
            (staging / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
            rank = check_adapter(staging, base)
            with self._edit() as state:
                check_owner(state, name, owner)
                entry = state.adapters.get(name) or AdapterEntry(name=name, owner=owner)
                version = entry.next_version
                target = self.adapter_dir(name, version)
                # A directory here that the registry does not list is a publish cut off by a crash (after the
                # rename, before the registry write): discard it, so a crash never leaves the name unusable.
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(target)
                entry.versions[version] = AdapterVersion(version=version, path=str(target.relative_to(self.root)),
                                                         source=source, rank=rank, metadata=meta)
                entry.next_version = version + 1
                state.adapters[name] = entry
            return f"{name}@{version}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def promote(self, name: str, version: int, canary_share: float | None = None) -> RegistryState:
        """Moves the alias to ``version``; with canary_share, first splits traffic (old alias keeps the rest)."""
        with self._edit() as state:
            entry = self._entry(state, name)
            if version not in entry.versions:
                raise NotFound(f"model '{name}@{version}' not found", param="version", code="model_not_found")
            if canary_share is not None:
                if not 0 < canary_share < 1:
                    raise InvalidRequest("canary share must be in (0, 1)", param="canary")
                if entry.alias is None or entry.alias == version:
                    raise Conflict(f"a canary needs a current alias other than {name}@{version}", param="canary")
                entry.canary = {entry.alias: 1 - canary_share, version: canary_share}
            else:
                if entry.alias is not None and entry.alias != version:
                    entry.alias_history.append(entry.alias)
                entry.alias, entry.canary = version, None
            return state

    def rollback(self, name: str) -> RegistryState:
        """Ends a canary (back to the alias) or moves the alias back to its previous target."""
        with self._edit() as state:
            entry = self._entry(state, name)
            if entry.canary:
                entry.canary = None
            elif entry.alias_history:
                entry.alias = entry.alias_history.pop()
            else:
                raise Conflict(f"{name} has no previous version to roll back to", param="name")
            return state

    def delete(self, name: str, version: int) -> None:
        with self._edit() as state:
            entry = self._entry(state, name)
            if version not in entry.versions:
                raise NotFound(f"model '{name}@{version}' not found", param="model", code="model_not_found")
            if version == entry.alias or (entry.canary and version in entry.canary):
                raise Conflict(f"{name}@{version} is what '{name}' serves; promote another version first",
                               param="model")
            del entry.versions[version]
            entry.alias_history = [v for v in entry.alias_history if v != version]
        shutil.rmtree(self.adapter_dir(name, version), ignore_errors=True)

    @staticmethod
    def _entry(state: RegistryState, name: str) -> AdapterEntry:
        entry = state.adapters.get(name)
        if entry is None:
            raise NotFound(f"model {name!r} not found", param="name", code="model_not_found")
        return entry


def resolve(state: RegistryState, model: str, rng: random.Random | None = None) -> str:
    """'name' / 'name@v' -> the immutable version id 'name@v' to serve (canary split applied)."""
    name, version = parse_model_id(model)
    entry = state.adapters.get(name)
    if entry is None:
        raise NotFound(f"model {model!r} not found", param="model", code="model_not_found")
    if version is not None:
        if version not in entry.versions:
            raise NotFound(f"model {model!r} not found; versions: "
                           f"{', '.join(f'{name}@{v}' for v in sorted(entry.versions))}",
                           param="model", code="model_not_found")
        return f"{name}@{version}"
    if entry.canary:
        versions, weights = zip(*sorted(entry.canary.items()))
        return f"{name}@{(rng or random).choices(versions, weights)[0]}"
    if entry.alias is None:
        raise NotFound(f"model {name!r} has no promoted version; call a version directly, e.g. "
                       f"{name}@{max(entry.versions)}" if entry.versions else f"model {name!r} has no versions",
                       param="model", code="model_not_found")
    return f"{name}@{entry.alias}"
