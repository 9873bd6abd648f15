"""Adapter registry: name -> immutable versions, an alias per name, optional canary split.

Persisted on the storage root (a path, s3:// or gs://) as generation objects ``registry/<n>.json``
updated by compare-and-set (app/documents.py), so any number of processes on any nodes can write it
and a crash never leaves a half-written registry. A version's files are uploaded once to
``adapters/<name>/<uuid>/`` before the registry names them, and never change.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from llmaas.app.documents import VersionedDocument
from llmaas.app.errors import InvalidRequest, NotFound
from llmaas.app.names import NAME_RE, name_problem
from llmaas.app.storage import (
    OBJECT_SCHEMES,
    Storage,
    StorageUnavailable,
    is_uri,
    open_location,
    open_storage,
    relative_key,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "metadata.json")
REGISTRY_PREFIX = "registry"  # generation objects registry/<generation>.json (app/documents.py)
LEGACY_FILE = "registry.json"  # the single file older releases wrote; read when no generation exists yet
ADAPTERS_PREFIX = "adapters"
T = TypeVar("T")
logger = logging.getLogger(__name__)


class Conflict(InvalidRequest):
    """A registry operation that contradicts its state (e.g. deleting the alias target)."""

    status_code = 409


class AdapterVersion(BaseModel):
    version: int
    path: str  # key of the version's directory, relative to the storage root
    files: dict[str, str] = Field(default_factory=dict)  # file name -> sha256, checked when a replica pulls it
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
    problem = name_problem(name)
    if problem is not None:
        raise InvalidRequest(f"adapter name {problem}", param=param)
    return name


def check_adapter(src: Path, base: BaseModelInfo) -> int:
    """Validates a PEFT LoRA dir against the base model; returns its rank. Never unpickles anything."""
    # here, not at the top: the engine brings torch (~1.5 s of imports), which the registry, usage and access
    # actors (they import this module) would otherwise pay at every start without ever checking an adapter
    from llmaas.engine.lora import AdapterError, check_fits, load_peft_adapter

    try:
        adapter = load_peft_adapter(src, "check", base.num_layers, base.max_rank)
        check_fits(adapter, base.projection_shapes, src)
    except (AdapterError, KeyError, ValueError, OSError) as exc:
        raise InvalidRequest(f"adapter rejected: {exc}", param="path") from None
    meta_file = src / "metadata.json"
    if meta_file.is_file():
        fp = read_metadata(src).get("base_fingerprint")
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
    """The registry on a storage backend: a VersionedDocument of RegistryState plus immutable adapter directories.

    Publishing uploads the validated copy to a fresh key (``adapters/<name>/<uuid>/``) first and only then
    commits the registry generation that names it, so no reader ever sees a version whose files are not all
    there, and a publish cut off at any point leaves at most an unlisted directory behind.
    """

    def __init__(self, storage: Storage | Path | str) -> None:
        self.storage = open_storage(storage)
        self.doc = VersionedDocument(self.storage, REGISTRY_PREFIX)

    # ----- persistence -----
    def load(self) -> RegistryState:
        _generation, content = self.doc.read()
        return self._parse(content)

    def _parse(self, content: bytes | None) -> RegistryState:
        if content is None:
            try:  # a registry written before generations existed: the base of the first new one
                content = self.storage.read(LEGACY_FILE)
            except FileNotFoundError:
                return RegistryState()
        return RegistryState.model_validate_json(content)

    def _edit(self, change: Callable[[RegistryState], T]) -> T:
        """Runs ``change`` on the newest state and commits it as the next generation (compare-and-set; re-run on
        a lost race). An exception from ``change`` aborts with nothing written."""
        def apply(content: bytes | None) -> tuple[bytes, T]:
            state = self._parse(content)
            result = change(state)
            state.generation += 1
            return state.model_dump_json(indent=2).encode(), result

        return self.doc.update(apply)

    def restamp(self, above: int) -> None:
        """Moves the generation past ``above``: after the registry is restored from a backup its generation is
        older than what Routers have seen, and generations must only grow for them to take the new state."""
        def change(state: RegistryState) -> None:
            state.generation = max(state.generation, above)  # _edit adds one

        self._edit(change)

    def version(self, name: str, version: int, state: RegistryState | None = None) -> AdapterVersion:
        entry = (state or self.load()).adapters.get(name)
        if entry is None or version not in entry.versions:
            raise NotFound(f"model '{name}@{version}' not found", param="model", code="model_not_found")
        return entry.versions[version]

    # ----- operations -----
    def register(self, name: str, src: Path | str, base: BaseModelInfo, source: str = "",
                 metadata: dict[str, Any] | None = None, owner: str | None = None) -> str:
        """Copies a PEFT LoRA dir (a path or a storage URI) in as the next version of ``name``; returns 'name@v'."""
        validate_name(name)
        with tempfile.TemporaryDirectory(prefix="llmaas-register-") as tmp:
            staging = Path(tmp) / "adapter"
            fetch_adapter(src, staging, base, self.storage)
            meta = dict(metadata or {})
            if (staging / "metadata.json").is_file():
                meta = {**read_metadata(staging), **meta}
            (staging / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
            rank = check_adapter(staging, base)  # what is published is exactly what was checked
            files = {f: sha256_file(staging / f) for f in ADAPTER_FILES}
            key = f"{ADAPTERS_PREFIX}/{name}/{uuid.uuid4().hex}"
            try:
                self.storage.for_tenant(owner).upload_dir(staging, key)  # under its owner's data key if sealed
            except BaseException:
                self._discard_unless_named(key)
                raise

        def change(state: RegistryState) -> int:
            check_owner(state, name, owner)
            entry = state.adapters.get(name) or AdapterEntry(name=name, owner=owner)
            version = entry.next_version
            entry.versions[version] = AdapterVersion(version=version, path=key, source=source, rank=rank,
                                                     metadata=meta, files=files)
            entry.next_version = version + 1
            state.adapters[name] = entry
            return version

        try:
            version = self._edit(change)
        except BaseException:
            self._discard_unless_named(key)
            raise
        return f"{name}@{version}"

    def _discard_unless_named(self, key: str) -> None:
        """Deletes an upload after a failed publish, unless the commit did land (its answer lost): a version named
        by the registry keeps its files. Best effort: an upload no version names is never served anyway."""
        try:
            if not any(v.path == key for e in self.load().adapters.values() for v in e.versions.values()):
                self.storage.delete(key)
        except OSError:
            logger.warning("left an unpublished upload at %s", key, exc_info=True)

    def promote(self, name: str, version: int, canary_share: float | None = None) -> RegistryState:
        """Moves the alias to ``version``; with canary_share, first splits traffic (old alias keeps the rest)."""
        def change(state: RegistryState) -> RegistryState:
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
            return state  # the committed state (_edit bumps its generation): no second read of storage

        return self._edit(change)

    def rollback(self, name: str) -> RegistryState:
        """Ends a canary (back to the alias) or moves the alias back to its previous target."""
        def change(state: RegistryState) -> RegistryState:
            entry = self._entry(state, name)
            if entry.canary:
                entry.canary = None
            elif entry.alias_history:
                entry.alias = entry.alias_history.pop()
            else:
                raise Conflict(f"{name} has no previous version to roll back to", param="name")
            return state

        return self._edit(change)

    def delete(self, name: str, version: int) -> None:
        def change(state: RegistryState) -> str:
            entry = self._entry(state, name)
            if version not in entry.versions:
                raise NotFound(f"model '{name}@{version}' not found", param="model", code="model_not_found")
            if version == entry.alias or (entry.canary and version in entry.canary):
                raise Conflict(f"{name}@{version} is what '{name}' serves; promote another version first",
                               param="model")
            path = entry.versions.pop(version).path
            entry.alias_history = [v for v in entry.alias_history if v != version]
            return path

        path = self._edit(change)
        try:  # the version is gone from the registry now; its files are only garbage from here on
            self.storage.delete(path)
        except OSError:
            logger.warning("deleted %s@%s but could not remove its files at %s", name, version, path, exc_info=True)

    @staticmethod
    def _entry(state: RegistryState, name: str) -> AdapterEntry:
        entry = state.adapters.get(name)
        if entry is None:
            raise NotFound(f"model {name!r} not found", param="name", code="model_not_found")
        return entry


def read_metadata(adapter_dir: Path) -> dict[str, Any]:
    """An adapter's metadata.json ({} when absent); anything but a JSON object is the caller's 400."""
    try:
        meta = json.loads((adapter_dir / "metadata.json").read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"adapter rejected: metadata.json is not valid JSON ({exc})", param="path") from None
    if not isinstance(meta, dict):
        raise InvalidRequest("adapter rejected: metadata.json must hold a JSON object", param="path")
    return meta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_adapter(src: Path | str, dest: Path, base: BaseModelInfo, storage: Storage | None = None) -> None:
    """Copies a PEFT LoRA dir's files (content, never symlinks) from a path or an s3:// / gs:// prefix into
    ``dest``; a local source is checked first, for a clear 400 (missing files, pickle, shapes) before anything is
    copied. A path or prefix under ``storage`` (a finished job's output) is read through it (no new client;
    decrypted in memory on an encrypted root)."""
    dest.mkdir(parents=True)
    text = str(src)
    try:  # a path under an encrypted root is read through it (decrypted); any other path as before
        key = relative_key(storage, text) if storage is not None and (is_uri(text) or storage.encrypted) else None
    except ValueError as exc:
        raise InvalidRequest(f"adapter path {text!r}: {exc}", param="path") from None
    if is_uri(text) or key is not None:
        if is_uri(text) and urlsplit(text).scheme not in OBJECT_SCHEMES:
            raise InvalidRequest(f"adapter path {text!r}: give a local directory or an "
                                 f"{' / '.join(s + '://' for s in OBJECT_SCHEMES)} prefix", param="path")
        try:
            remote, key = (storage, key) if key is not None else (open_location(text), "")
            for f in ADAPTER_FILES:
                try:
                    (dest / f).write_bytes(remote.read(f"{key}/{f}" if key else f))
                except FileNotFoundError:
                    continue
        except StorageUnavailable:
            raise
        except (OSError, ValueError, ImportError) as exc:  # access denied, a bad URI, no gcsfs: the caller's to fix
            raise InvalidRequest(f"adapter path {text!r} cannot be read: {exc}", param="path") from None
        return
    src = Path(src)
    check_adapter(src, base)
    for f in ADAPTER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dest / f)


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
