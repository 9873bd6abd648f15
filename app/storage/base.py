"""The storage seam: the interface every backend implements, and the key rules they share."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pyarrow.fs


class StorageUnavailable(OSError):
    """The storage could not be reached (connection refused or timed out after the client's retries)."""


class Storage(Protocol):
    """Objects under one root, addressed by keys such as ``"registry/gen-00000042.json"``.

    A key is a relative, ``/``-separated path; ``check_key`` says which are valid.
    Components starting with ``.`` are reserved for a backend's temp files, so no
    backend lists, writes or uploads them.
    """

    uri: str  # the root: "/abs/path" or "s3://bucket/prefix"
    encrypted: bool  # objects are sealed (``EncryptedStorage``): read them, never their local_path/url bytes

    def read(self, key: str) -> bytes:
        """The object's bytes. Raises FileNotFoundError if there is none."""

    def write(self, key: str, data: bytes) -> None:
        """Replace the object atomically: readers see the old bytes or the new, never part."""

    def create(self, key: str, data: bytes) -> bool:
        """Create the object only if absent, atomically across processes; False if it exists (never overwrites)."""

    def exists(self, key: str) -> bool:
        """Whether an object (not a mere prefix) is stored at ``key``."""

    def list(self, prefix: str) -> list[str]:
        """Every key equal to ``prefix`` or under ``prefix/`` (recursive), sorted; ``""`` lists the root."""

    def delete(self, key_or_prefix: str) -> None:
        """Remove a key and everything under it as a prefix; a missing one is fine."""

    def upload_file(self, local_file: Path, key: str) -> None:
        """Store a local file's bytes at ``key``, streamed, replacing the object atomically like ``write``."""

    def upload_dir(self, local_dir: Path, prefix: str) -> None:
        """Store every regular file under ``local_dir`` (not symlinks, not hidden) as ``prefix/relpath``."""

    def download_dir(self, prefix: str, local_dir: Path) -> None:
        """Copy the objects under ``prefix`` into ``local_dir``, replacing it whole.

        The files land in a temp dir next to ``local_dir`` that is then renamed, so
        a reader of ``local_dir`` never sees half a download. Raises FileNotFoundError
        if nothing is stored under ``prefix``.
        """

    def url(self, key: str = "") -> str:
        """Where ``key`` (an object or a prefix) lives, for other tools: a filesystem path or ``s3://bucket/...``."""

    def local_path(self, key: str = "") -> Path | None:
        """The filesystem path of ``key`` for a local root; None for an object store."""

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """``(filesystem, root path in it)``, for Ray Train's ``RunConfig(storage_filesystem=, storage_path=)``."""

    def for_tenant(self, tenant: str | None) -> Storage:
        """This storage writing as ``tenant`` (under its own data key when encrypted; itself when clear)."""


def check_key(key: str, *, allow_root: bool = False) -> str:
    """``key`` itself if it is a valid relative key, else ValueError saying why.

    Args:
        key: A ``/``-separated relative path.
        allow_root: Accept ``""``, meaning the whole root (for prefixes).
    """
    if not isinstance(key, str):
        raise TypeError(f"storage key must be a str, got {type(key).__name__}")
    if key == "" and allow_root:
        return key
    problem = None
    if key == "":
        problem = "is empty"
    elif "\\" in key or "\0" in key:
        problem = "contains a backslash or NUL; use '/' between components"
    elif key.startswith("/"):
        problem = "is absolute; give a path relative to the storage root"
    elif any(part == "" for part in key.split("/")):
        problem = "has an empty component ('//' or a trailing '/')"
    elif any(part.startswith(".") for part in key.split("/")):
        problem = "has a component starting with '.' ('..', '.' and hidden names are reserved)"
    if problem:
        raise ValueError(f"storage key {key!r} {problem}")
    return key


def join_key(prefix: str, rel: str) -> str:
    """``prefix/rel``, or ``rel`` when ``prefix`` is the root."""
    return f"{prefix}/{rel}" if prefix else rel


def under(key: str, prefix: str) -> bool:
    """Whether ``key`` is ``prefix`` itself or lies below it (``"ab"`` is not under ``"a"``)."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def download_into(storage: Storage, prefix: str, local_dir: Path,
                  fetch: Callable[[list[tuple[str, Path]]], None]) -> None:
    """``Storage.download_dir`` for any backend: ``fetch`` copies each ``(key, destination)`` pair."""
    keys = storage.list(prefix)
    if not keys:
        raise FileNotFoundError(f"nothing stored under {prefix!r} in {storage.uri}; check the prefix")
    if prefix in keys:
        raise NotADirectoryError(f"{prefix!r} in {storage.uri} is an object, not a prefix; read() it instead")

    def fill(tmp: Path) -> None:
        pairs = [(key, tmp / key[len(prefix):].lstrip("/")) for key in keys]
        for _, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
        fetch(pairs)

    replace_dir(Path(local_dir), fill)


def local_files(local_dir: Path) -> list[tuple[Path, str]]:
    """``(path, relative key)`` for every regular file under ``local_dir``, sorted.

    Symlinks are skipped (an upload must not follow them out of the tree), and so
    are hidden files and folders such as ``.cache/``: their names are not valid keys.
    """
    if not local_dir.is_dir():
        raise NotADirectoryError(f"{local_dir} is not a directory; give the folder to upload")
    found = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # os.walk does not follow dir symlinks
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and not path.is_symlink() and path.is_file():
                found.append((path, path.relative_to(local_dir).as_posix()))
    return sorted(found, key=lambda item: item[1])


def replace_dir(local_dir: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` populate a fresh temp dir next to ``local_dir``, then rename it into place.

    An existing ``local_dir`` is moved aside first and removed after, since rename
    cannot replace a non-empty directory; for that instant ``local_dir`` is absent.
    """
    local_dir = Path(local_dir)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}-", dir=local_dir.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, local_dir)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            old = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}-old-", dir=local_dir.parent))
            os.rename(local_dir, old / "dir")
            os.rename(tmp, local_dir)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
