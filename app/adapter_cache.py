"""A model replica's local copies of adapter versions: pulled from storage on first use, checksummed, LRU by bytes.

A replica on a node without the storage root mounted (the root is s3:// or gs://) still serves every
registered version: the first request for one pulls its directory here. Versions are immutable, so a
cached copy never goes stale; the sha256 the registry recorded at publish time is checked on every pull.
On a local (or shared-mounted) root nothing is copied: the engine reads the published directory itself.
On an encrypted root nothing is cached on disk either: each load reads and decrypts the files into memory.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from llmaas.app.registry import AdapterVersion, sha256_file
from llmaas.app.storage import Storage


class ChecksumMismatch(OSError):
    """A pulled file is not the one the registry recorded (corrupt or replaced in storage)."""


class AdapterCache:
    def __init__(self, storage: Storage, cache_dir: Path, max_bytes: int) -> None:
        self.storage = storage
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, int] = OrderedDict()  # local dir name -> bytes, least recently used first
        self._lock = threading.Lock()  # guards _entries and _pulling
        self._pulling: dict[str, threading.Lock] = {}  # one pull per version at a time; later callers wait for it
        self.pulls = 0  # versions downloaded (a test and the metrics read it)

    def source(self, version: AdapterVersion) -> Path | dict[str, bytes]:
        """What the engine loads ``version`` from: a local directory, or, when the storage is encrypted, the files'
        bytes decrypted in memory (nothing decrypted touches the disk). Blocking: call it off the event loop.

        Sealed files are not checksummed again: AES-GCM already refuses any byte that differs from what was
        sealed at that key, and version keys are never rewritten (the sha256 would cost ~40% of the load)."""
        if self.storage.encrypted:
            files = {file: self.storage.read(f"{version.path}/{file}") for file in version.files}
            self.pulls += 1
            return files
        return self.path(version)

    def path(self, version: AdapterVersion) -> Path:
        """A local directory holding ``version``'s files. Blocking (may download): call it off the event loop."""
        local = self.storage.local_path(version.path)
        if local is not None:
            return local
        name = hashlib.sha256(f"{self.storage.uri}/{version.path}".encode()).hexdigest()[:32]
        with self._lock:
            pulling = self._pulling.setdefault(name, threading.Lock())
        with pulling:  # a concurrent first use of the same version waits here and then finds it cached
            return self._cached(name) or self._pull(name, version)

    def _cached(self, name: str) -> Path | None:
        with self._lock:
            if name in self._entries and (self.cache_dir / name).is_dir():
                self._entries.move_to_end(name)
                return self.cache_dir / name
        return None

    def _pull(self, name: str, version: AdapterVersion) -> Path:
        target = self.cache_dir / name
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache_dir))
        try:
            self.storage.download_dir(version.path, staging / "d")
            for file, digest in version.files.items():
                if sha256_file(staging / "d" / file) != digest:
                    raise ChecksumMismatch(f"{version.path}/{file}: sha256 differs from the registered one")
            size = sum(p.stat().st_size for p in (staging / "d").iterdir())
            with self._lock:
                shutil.rmtree(target, ignore_errors=True)
                (staging / "d").rename(target)
                self._entries[name] = size
                self.pulls += 1
                self._evict(keep=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _evict(self, keep: str) -> None:
        """Drops least recently used copies until the cache fits (the one just pulled always stays)."""
        while sum(self._entries.values()) > self.max_bytes and len(self._entries) > 1:
            name = next(n for n in self._entries if n != keep)
            del self._entries[name]
            shutil.rmtree(self.cache_dir / name, ignore_errors=True)
