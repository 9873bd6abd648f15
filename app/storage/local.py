"""Storage on a local (or shared POSIX) filesystem: a crash leaves the old file or the new one, never half of either."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from llmaas.app.storage.base import check_key, download_into, join_key, local_files

if TYPE_CHECKING:
    import pyarrow.fs


def atomic_write(path: Path, text: str | bytes) -> None:
    """temp file in the same directory + fsync + os.replace (+ fsync of the directory)."""
    data = text.encode() if isinstance(text, str) else text
    _publish(path, lambda f: f.write(data), os.replace)


def inside(root: Path, *parts: str) -> Path:
    """``root / parts`` resolved, refusing anything (.., absolute parts, symlinks) that lands outside root."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"path {'/'.join(parts)!r} escapes {root}")
    return path


def _publish(path: Path, fill: Callable[[IO[bytes]], object], place: Callable[[str, Path], None]) -> None:
    """Write a temp file next to ``path`` with ``fill``, fsync it, ``place(tmp, path)``, fsync the directory.

    The temp name starts with "." so listings skip it; it is removed whatever happens.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        place(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _copy_from(src: Path) -> Callable[[IO[bytes]], None]:
    def fill(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    return fill


class LocalStorage:
    """Keys as files under a directory; keys that resolve outside it (``..``, symlinks) are refused.

    Args:
        root: The directory; it need not exist yet.
    """

    encrypted = False

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"storage root {self.root} is not a directory; give a folder path")
        self.uri = str(self.root)

    def _path(self, key: str, *, allow_root: bool = False) -> Path:
        check_key(key, allow_root=allow_root)
        return inside(self.root, *key.split("/")) if key else self.root.resolve()

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        created = False

        def link(tmp: str, path: Path) -> None:
            nonlocal created
            try:
                os.link(tmp, path)  # fails if the name exists, so one creator wins, even across processes
                created = True
            except FileExistsError:
                pass

        _publish(self._path(key), lambda f: f.write(data), link)
        return created

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix, allow_root=True)
        if base.is_file():
            return [prefix]
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(base).as_posix()
            keys += [join_key(prefix, name if rel == "." else f"{rel}/{name}")
                     for name in filenames if not name.startswith(".")]
        return sorted(keys)

    def delete(self, key_or_prefix: str) -> None:
        path = self._path(key_or_prefix)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def upload_file(self, local_file: Path, key: str) -> None:
        _publish(self._path(key), _copy_from(Path(local_file)), os.replace)

    def upload_dir(self, local_dir: Path, prefix: str) -> None:
        check_key(prefix, allow_root=True)
        for src, rel in local_files(Path(local_dir)):
            self.upload_file(src, join_key(prefix, rel))

    def download_dir(self, prefix: str, local_dir: Path) -> None:
        def fetch(pairs: list[tuple[str, Path]]) -> None:
            for key, dst in pairs:
                shutil.copyfile(self._path(key), dst)

        download_into(self, prefix, local_dir, fetch)

    def url(self, key: str = "") -> str:
        self._path(key, allow_root=True)  # refuses a key that escapes the root
        return str(self.root / key) if key else self.uri

    def local_path(self, key: str = "") -> Path | None:
        return self._path(key, allow_root=True)

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs  # pyarrow comes with ray[train]; kept off the import path of callers that never train

        return pyarrow.fs.LocalFileSystem(), str(self.root)

    def for_tenant(self, tenant: str | None) -> LocalStorage:
        return self  # clear: one storage for every tenant
