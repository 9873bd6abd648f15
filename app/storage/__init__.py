"""Where llmaas keeps its state: one ``Storage`` interface, a local and an object-store backend.

``open_storage`` is the one place that picks the backend for a root.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

from llmaas.app.storage.base import Storage, StorageUnavailable, check_key
from llmaas.app.storage.encrypted import (
    CorruptObject,
    EncryptedStorage,
    EncryptionKeyError,
    enable_encryption,
    encrypted_view,
)
from llmaas.app.storage.local import LocalStorage, atomic_write, inside
from llmaas.app.storage.object_store import BACKENDS, ObjectStorage

__all__ = ["OBJECT_SCHEMES", "CorruptObject", "EncryptedStorage", "EncryptionKeyError", "LocalStorage", "ObjectStorage",
           "Storage", "StorageUnavailable", "atomic_write", "check_key", "enable_encryption", "inside", "is_uri",
           "open_location", "open_storage", "relative_key", "storage_id"]


def is_uri(root: str) -> bool:
    """Whether ``root`` is a URI (``s3://...``, ``file://...``) rather than a plain path."""
    return "://" in root


OBJECT_SCHEMES = ("s3", "gs")  # the object stores a root or an adapter source may name
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=64)
def _object_storage(uri: str, *endpoint_env: str | None) -> ObjectStorage:
    return ObjectStorage(uri)  # reads the environment named in the cache key


def storage_id(root: str | Path) -> str:
    """A stable name for a storage root: every spelling of one root (``/srv/x/``, ``file:///srv/x``,
    ``s3://b//p/``) gives the same id, without opening a client."""
    text = str(root).strip()
    parts = urlsplit(text)
    if not is_uri(text) or parts.scheme == "file":
        return str(Path(parts.path if is_uri(text) else text).resolve())
    prefix = "/".join(p for p in parts.path.split("/") if p)
    return f"{parts.scheme}://{parts.netloc}" + (f"/{prefix}" if prefix else "")


def relative_key(storage: Storage, url: str) -> str | None:
    """The key of ``url`` under ``storage``'s root (a path or URI that ``storage.url`` could have produced), or
    None when it lies elsewhere."""
    root = storage_id(storage.uri)
    target = storage_id(url)
    if target.startswith(root + "/"):
        return check_key(target[len(root) + 1:])
    return None


def open_storage(root: str | Path | Storage, *, encrypt: bool = False) -> Storage:
    """The storage for ``root``: sealed (``EncryptedStorage``) when the root is marked encrypted, else clear.

    Args:
        root: A directory (``/srv/llmaas``, ``file:///srv/llmaas``), an object-store
            URI (``s3://bucket/prefix``; ``gs://bucket/prefix``, untested), or a Storage
            already opened (returned as it is).
        encrypt: Mark the root encrypted first if it is not (AppConfig ``encrypt_at_rest``); this needs the
            master key in the environment and an empty or already encrypted root.

    Raises:
        ValueError: ``root`` is empty or has a scheme other than file, s3 or gs.
        ImportError: The package for the object store is missing (the message says which to install).
        EncryptionKeyError: The root is (or is to be) encrypted and this process has no usable master key.
    """
    if not isinstance(root, (str, Path)):  # already a Storage
        return root
    inner = open_location(root)
    if encrypt:
        enable_encryption(inner)
    return encrypted_view(inner, storage_id(inner.uri))


def open_location(root: str | Path) -> Storage:
    """A location that is not a storage root of ours (a user's adapter directory or training-data bucket), opened
    as it is: its objects are read as stored, and no encryption marker is looked for (a read-only credential is
    enough)."""
    if isinstance(root, Path):
        return LocalStorage(root)
    text = root.strip()
    if not text:
        raise ValueError("storage root is empty; give a directory or an s3://bucket/prefix URI")
    if not is_uri(text):
        return LocalStorage(Path(text))
    parts = urlsplit(text)
    if parts.scheme in BACKENDS:  # one client per root and endpoint in a process: a new one costs ~0.4 s of CPU
        return _object_storage(text, *(os.environ.get(v) for v in ENDPOINT_ENV))
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return LocalStorage(Path(parts.path))
    raise ValueError(f"storage root {text!r}: unsupported scheme {parts.scheme!r}; "
                     f"give a path, file:///path, s3://bucket/prefix or gs://bucket/prefix")
