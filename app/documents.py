"""A JSON document on any storage backend, updated by compare-and-set: the registry and job records use it.

The document is a series of immutable generation objects, ``<prefix>/<generation:012d>.json``; the newest
is the document (each object's first line is the id of the writer that created it, the JSON follows).
An update reads generation g, computes the new content and *creates* g + 1 with a
conditional write (create only if absent: S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, a hard link
on a local disk). Two writers that read the same g race for the same key and exactly one wins; the loser
re-reads and re-applies its change. Why generations rather than overwriting one key with ``If-Match``: a
create-only write is the one conditional operation every object store (and POSIX) offers, a reader never
sees a torn object, and the last few generations are a history an operator can restore from.
"""
from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from llmaas.app.errors import ServiceUnavailable
from llmaas.app.storage import Storage

T = TypeVar("T")
logger = logging.getLogger(__name__)
GENERATION_RE = re.compile(r"^(\d{12})\.json$")
MAX_ATTEMPTS = 64  # compare-and-set retries before a writer gives up (each lost race means another writer won)
KEEP = 20  # generations kept behind the newest (history; also covers readers that listed a moment ago)


class VersionedDocument:
    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix.rstrip("/")

    def key(self, generation: int) -> str:
        return f"{self.prefix}/{generation:012d}.json"

    def generations(self) -> list[int]:
        out = []
        for key in self.storage.list(self.prefix):
            m = GENERATION_RE.match(key.rsplit("/", 1)[-1])
            if m and key.startswith(self.prefix + "/"):
                out.append(int(m.group(1)))
        return sorted(out)

    def read(self) -> tuple[int, bytes | None]:
        """(generation, content) of the newest generation; (0, None) when there is none."""
        gens, content = self._newest()
        return (gens[-1] if gens else 0), content

    def _newest(self) -> tuple[list[int], bytes | None]:
        """(every generation listed, content of the newest): one listing serves the read and the prune after."""
        for _ in range(MAX_ATTEMPTS):
            gens = self.generations()
            if not gens:
                return [], None
            try:
                return gens, self._body(self.storage.read(self.key(gens[-1])))[1]
            except FileNotFoundError:  # pruned between the listing and the read: a newer one exists
                continue
        raise ServiceUnavailable(f"{self.prefix}: could not read a stable generation; retry")

    def update(self, change: Callable[[bytes | None], tuple[bytes, T]]) -> T:
        """Applies ``change(content) -> (new_content, result)`` atomically and returns ``result``. ``change`` may
        raise to abort (nothing is written) and is re-run after a lost race, so it must be a pure function of the
        content it is given."""
        for attempt in range(MAX_ATTEMPTS):
            gens, content = self._newest()
            generation = gens[-1] if gens else 0
            new_content, result = change(content)
            writer = uuid.uuid4().hex.encode()
            key = self.key(generation + 1)
            if self.storage.create(key, writer + b"\n" + new_content) or self._wrote(key, writer):
                self._prune(gens, generation + 1)
                return result
            time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** attempt)))  # another writer won: back off, re-read
        raise ServiceUnavailable(f"{self.prefix}: too many concurrent writers; retry")

    def _wrote(self, key: str, writer: bytes) -> bool:
        """Whether the object at ``key`` is this writer's: a client that retried its own successful conditional PUT
        (the first answer lost) is told "exists", and must not apply its change a second time."""
        try:
            return self._body(self.storage.read(key))[0] == writer
        except FileNotFoundError:
            return False

    @staticmethod
    def _body(data: bytes) -> tuple[bytes, bytes]:
        """(writer id, content) of a generation object: the first line names the writer."""
        writer, _, content = data.partition(b"\n")
        return writer, content

    def _prune(self, listed: list[int], newest: int) -> None:
        """Deletes the ``listed`` generations more than KEEP behind ``newest``. Best effort: the new generation is
        committed whatever happens here (a failed delete is retried by the next writer's prune)."""
        try:
            for generation in listed:
                if generation < newest - KEEP:
                    self.storage.delete(self.key(generation))
        except OSError:
            logger.warning("could not prune old generations of %s", self.prefix, exc_info=True)
