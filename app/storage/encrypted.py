"""Encryption at rest: envelope encryption over any ``Storage`` (AES-256-GCM from ``cryptography``).

A storage root is encrypted once it holds the marker object ``encryption/root.json``; every process that
opens it (``open_storage``) then reads and writes through ``EncryptedStorage`` and needs the master key,
from ``LLMAAS_MASTER_KEY_FILE`` (a file holding the key in base64) or ``LLMAAS_MASTER_KEY`` (the base64
text). A root without the marker stays in the clear, so roots never mix the two.

* Each tenant has its own 256-bit data key, made on its first write, stored at
  ``encryption/data-keys/<sha256(tenant)>.json`` wrapped (AES-GCM) by the master key together with the
  master key's id. Rotating the master key (``rotate_master_key``) re-wraps these few objects and rewrites
  no data. Deleting a tenant's data-key object makes everything written under it unreadable.
* Every object is ``MAGIC | tenant | nonce | AES-GCM(data key, plaintext)``; the object's key is
  authenticated data, so bytes moved to another key, or altered, fail to decrypt with an error that says
  so. A wrong master key is named as such (its id differs from the one that wrapped the data key), never
  decrypted into garbage.
* Nothing is decrypted to disk by this module except ``download_dir`` (asked for by name); adapters are
  served from ``read()`` bytes, training files are parsed from ``read()`` bytes.
* Ray Train checkpoints go through ``arrow_filesystem()``: a pyarrow ``PyFileSystem`` that seals each
  file as it is closed and opens it decrypted in memory.
What stays in the clear: object keys (ids, adapter names, the layout), object sizes and times.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import struct
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmaas.app.storage.base import Storage, StorageUnavailable, download_into, join_key, local_files

MASTER_KEY_ENV = "LLMAAS_MASTER_KEY"
MASTER_KEY_FILE_ENV = "LLMAAS_MASTER_KEY_FILE"
MARKER = "encryption/root.json"
DATA_KEYS = "encryption/data-keys"
MAGIC = b"LLMAASE1"
SYSTEM = "_system"  # the data key of objects no tenant owns (registry, job records, usage, audit)
_NONCE = 12


class EncryptionKeyError(StorageUnavailable):
    """The storage cannot be read with the key this process has: no key, a wrong key, or altered bytes."""


def new_master_key() -> str:
    """A fresh master key, base64 text (what ``LLMAAS_MASTER_KEY_FILE`` holds)."""
    return base64.b64encode(os.urandom(32)).decode()


def parse_master_key(text: str | bytes, where: str) -> bytes:
    raw = text.strip() if isinstance(text, bytes) else text.strip().encode()
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise EncryptionKeyError(f"{where}: a master key is 32 bytes in base64 (make one with "
                                 "`llmaas encryption new-key`)")
    return key


def master_key_from_env() -> bytes | None:
    """The master key this process was given, or None."""
    if path := os.environ.get(MASTER_KEY_FILE_ENV):
        try:
            return parse_master_key(Path(path).read_bytes(), f"{MASTER_KEY_FILE_ENV}={path}")
        except OSError as exc:
            raise EncryptionKeyError(f"{MASTER_KEY_FILE_ENV}={path}: cannot read the key file ({exc})") from None
    if text := os.environ.get(MASTER_KEY_ENV):
        return parse_master_key(text, MASTER_KEY_ENV)
    return None


def key_id(master_key: bytes) -> str:
    """A public name for a master key (not derivable back into it): how a wrong key is told apart."""
    return hashlib.sha256(b"llmaas master key id\0" + master_key).hexdigest()[:16]


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)


class Keyring:
    """A root's data keys, unwrapped with one master key and kept in this process's memory."""

    def __init__(self, inner: Storage, master_key: bytes) -> None:
        self.inner = inner
        self.master_key = master_key
        self.master_id = key_id(master_key)
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @staticmethod
    def doc_key(tenant: str) -> str:
        return f"{DATA_KEYS}/{hashlib.sha256(tenant.encode()).hexdigest()[:32]}.json"

    def data_key(self, tenant: str, *, create: bool) -> bytes:
        with self._lock:
            if (key := self._keys.get(tenant)) is not None:
                return key
            try:
                key = self._unwrap(tenant, self.inner.read(self.doc_key(tenant)))
            except FileNotFoundError:
                if not create:
                    raise EncryptionKeyError(f"the data key of tenant {tenant!r} is gone from "
                                             f"{self.inner.uri}: what it encrypted cannot be read") from None
                key = os.urandom(32)
                if not self.inner.create(self.doc_key(tenant), self._wrap(tenant, key)):
                    key = self._unwrap(tenant, self.inner.read(self.doc_key(tenant)))  # another process won
            self._keys[tenant] = key
            return key

    def _wrap(self, tenant: str, key: bytes, master_key: bytes | None = None) -> bytes:
        master_key = master_key or self.master_key
        return json.dumps({"tenant": tenant, "master_key_id": key_id(master_key), "created_at": int(time.time()),
                           "wrapped": base64.b64encode(_seal(master_key, key, _aad(tenant))).decode()}).encode()

    def _unwrap(self, tenant: str, doc: bytes, master_key: bytes | None = None) -> bytes:
        master_key = master_key or self.master_key
        record = json.loads(doc)
        if record.get("master_key_id") != key_id(master_key):
            raise EncryptionKeyError(
                f"{self.inner.uri}: tenant {tenant!r}'s data key is wrapped by master key "
                f"{record.get('master_key_id')}, and this process has master key {key_id(master_key)}: set "
                f"{MASTER_KEY_FILE_ENV} to the key this root was encrypted with")
        try:
            return _open(master_key, base64.b64decode(record["wrapped"]), _aad(tenant))
        except (InvalidTag, KeyError, ValueError):
            raise EncryptionKeyError(f"{self.inner.uri}: tenant {tenant!r}'s data key object is damaged or was "
                                     "altered") from None


def _aad(tenant: str) -> bytes:
    return b"llmaas data key\0" + tenant.encode()


class EncryptedStorage:
    """``Storage`` whose objects are sealed under ``tenant``'s data key (``for_tenant`` picks another).

    Reads find the tenant in each object's header, so any view reads any object of the root.
    """

    encrypted = True

    def __init__(self, inner: Storage, keyring: Keyring, tenant: str = SYSTEM) -> None:
        self.inner = inner
        self.keyring = keyring
        self.tenant = tenant
        self.uri = inner.uri

    def for_tenant(self, tenant: str | None) -> EncryptedStorage:
        return EncryptedStorage(self.inner, self.keyring, tenant or SYSTEM)

    def seal(self, key: str, plaintext: bytes) -> bytes:
        name = self.tenant.encode()
        header = MAGIC + struct.pack(">H", len(name)) + name
        return header + _seal(self.keyring.data_key(self.tenant, create=True), plaintext, header + key.encode())

    def unseal(self, key: str, blob: bytes) -> bytes:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 2:
            raise EncryptionKeyError(f"{self.uri}: object {key!r} is not encrypted, in a root that is: it was not "
                                     "written by llmaas")
        (size,) = struct.unpack(">H", blob[len(MAGIC):len(MAGIC) + 2])
        end = len(MAGIC) + 2 + size
        tenant = blob[len(MAGIC) + 2:end].decode("utf-8", "replace")
        try:
            return _open(self.keyring.data_key(tenant, create=False), blob[end:], blob[:end] + key.encode())
        except InvalidTag:
            raise EncryptionKeyError(f"{self.uri}: object {key!r} fails authentication: altered in storage or "
                                     "copied from another key") from None

    def read(self, key: str) -> bytes:
        return self.unseal(key, self.inner.read(key))

    def write(self, key: str, data: bytes) -> None:
        self.inner.write(key, self.seal(key, data))

    def create(self, key: str, data: bytes) -> bool:
        return self.inner.create(key, self.seal(key, data))

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key_or_prefix: str) -> None:
        self.inner.delete(key_or_prefix)

    def upload_file(self, local_file: Path, key: str) -> None:
        self.write(key, Path(local_file).read_bytes())

    def upload_dir(self, local_dir: Path, prefix: str) -> None:
        for path, rel in local_files(Path(local_dir)):
            self.upload_file(path, join_key(prefix, rel))

    def download_dir(self, prefix: str, local_dir: Path) -> None:
        """Decrypts to ``local_dir`` (plaintext on disk: serving and training read objects into memory instead)."""
        def fetch(pairs: list[tuple[str, Path]]) -> None:
            for key, dst in pairs:
                dst.write_bytes(self.read(key))

        download_into(self, prefix, local_dir, fetch)

    def url(self, key: str = "") -> str:
        return self.inner.url(key)

    def local_path(self, key: str = "") -> Path | None:
        return None  # the bytes there are ciphertext: callers read() instead

    def arrow_filesystem(self):
        import pyarrow.fs

        fs, root = self.inner.arrow_filesystem()
        return pyarrow.fs.PyFileSystem(_sealing_fs_class()(fs, root.rstrip("/"), self)), root


@functools.cache
def _sealing_fs_class():
    """The pyarrow filesystem handler class, made on first use (pyarrow stays off the import path of
    processes that never train)."""
    import pyarrow
    import pyarrow.fs

    class _SealingFileSystem(pyarrow.fs.FileSystemHandler):
        """A pyarrow filesystem that seals files on close and opens them decrypted in memory (Ray Train's checkpoint
        uploads and downloads). Sizes it reports are the stored (sealed) sizes."""

        def __init__(self, fs, root: str, storage: EncryptedStorage) -> None:
            self.fs, self.root, self.storage = fs, root, storage

        def __reduce__(self):  # Ray ships the filesystem to Train workers: the root and tenant, never a key
            return _reopen_sealing_fs, (self.storage.uri, self.storage.tenant)

        def _key(self, path: str) -> str:
            path = path.rstrip("/")
            if not path.startswith(self.root + "/"):
                raise PermissionError(f"{path} lies outside the encrypted root {self.root}")
            return path[len(self.root) + 1:]

        def get_type_name(self) -> str:
            return f"llmaas-sealed+{self.fs.type_name}"

        def normalize_path(self, path: str) -> str:
            return self.fs.normalize_path(path)

        def equals(self, other) -> bool:
            return isinstance(other, _SealingFileSystem) and other.root == self.root and other.fs.equals(self.fs)

        def get_file_info(self, paths):
            return self.fs.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return self.fs.get_file_info(selector)

        def create_dir(self, path, recursive):
            self.fs.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            self.fs.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise PermissionError("refusing to empty the root of an encrypted storage")

        def delete_file(self, path):
            self.fs.delete_file(path)

        def move(self, src, dest):  # the key is authenticated: re-seal under the new one
            self.copy_file(src, dest)
            self.fs.delete_file(src)

        def copy_file(self, src, dest):
            data = self._read(src)
            with self.open_output_stream(dest, None) as out:
                out.write(data)

        def _read(self, path: str) -> bytes:
            with self.fs.open_input_stream(path) as f:
                return self.storage.unseal(self._key(path), f.read())

        def open_input_stream(self, path):
            import pyarrow

            return pyarrow.BufferReader(self._read(path))

        def open_input_file(self, path):
            return self.open_input_stream(path)

        def open_output_stream(self, path, metadata):
            import pyarrow

            return pyarrow.PythonFile(_SealOnClose(self, path), mode="w")

        def open_append_stream(self, path, metadata):
            raise OSError("appending to an encrypted object is not supported")

    return _SealingFileSystem


def _reopen_sealing_fs(uri: str, tenant: str):
    """The sealing handler of ``uri`` rebuilt in another process, with that process's own master key."""
    from llmaas.app.storage import open_storage

    storage = open_storage(uri)
    if not isinstance(storage, EncryptedStorage):
        raise EncryptionKeyError(f"{uri} is no longer marked encrypted")
    storage = storage.for_tenant(tenant)
    fs, root = storage.inner.arrow_filesystem()
    return _sealing_fs_class()(fs, root.rstrip("/"), storage)


class _SealOnClose(io.RawIOBase):
    """Collects a file's bytes in memory and writes them sealed when closed."""

    def __init__(self, owner, path: str) -> None:  # owner: the sealing filesystem handler
        super().__init__()
        self.owner, self.path, self.buffer = owner, path, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def close(self) -> None:
        if not self.closed:
            sealed = self.owner.storage.seal(self.owner._key(self.path), self.buffer.getvalue())
            self.owner.fs.create_dir(self.path.rpartition("/")[0], recursive=True)  # a local fs needs the parent
            with self.owner.fs.open_output_stream(self.path) as out:
                out.write(sealed)
        super().close()


_keyrings: dict[tuple[str, bytes], Keyring] = {}  # one per root and master key in a process: data keys unwrapped once
_keyrings_lock = threading.Lock()


def _keyring(root_id: str, master_key: bytes, inner: Storage) -> Keyring:
    with _keyrings_lock:
        return _keyrings.setdefault((root_id, master_key), Keyring(inner, master_key))


def marker_of(inner: Storage) -> dict | None:
    try:
        return json.loads(inner.read(MARKER))
    except FileNotFoundError:
        return None


def encrypted_view(inner: Storage, root_id: str) -> Storage:
    """``inner`` itself for a clear root; an ``EncryptedStorage`` over it for an encrypted one (the master key is
    required then: EncryptionKeyError names what is missing)."""
    if not inner.exists(MARKER):
        return inner
    master = master_key_from_env()
    if master is None:
        raise EncryptionKeyError(f"storage root {inner.uri} is encrypted: give this process its master key "
                                 f"({MASTER_KEY_FILE_ENV}=path or {MASTER_KEY_ENV}=base64)")
    return EncryptedStorage(inner, _keyring(root_id, master, inner))


def enable_encryption(inner: Storage) -> None:
    """Marks ``inner``'s root encrypted (idempotent). A root that already holds clear objects is refused: its
    old objects would stay readable to anyone with the disk, so encryption starts on a new root."""
    master = master_key_from_env()
    if master is None:
        raise EncryptionKeyError(f"encryption at rest is on but no master key was given: set {MASTER_KEY_FILE_ENV} "
                                 f"(a file from `llmaas encryption new-key`) or {MASTER_KEY_ENV}")
    if inner.exists(MARKER):
        return
    if inner.list(""):
        raise EncryptionKeyError(f"storage root {inner.uri} already holds unencrypted objects; point storage_root "
                                 "at a new, empty location to encrypt at rest")
    inner.create(MARKER, json.dumps({"version": 1, "cipher": "AES-256-GCM", "envelope": "per-tenant data keys",
                                     "created_at": int(time.time())}).encode())


def rotate_master_key(inner: Storage, old_key: bytes, new_key: bytes) -> int:
    """Re-wraps every data key of ``inner``'s root from ``old_key`` to ``new_key``; data is not rewritten.
    Resumable: data keys already under ``new_key`` are skipped. Returns how many were re-wrapped."""
    ring = Keyring(inner, old_key)
    done = 0
    for doc_key in inner.list(DATA_KEYS):
        record = json.loads(inner.read(doc_key))
        if record.get("master_key_id") == key_id(new_key):
            continue
        tenant = record["tenant"]
        key = ring._unwrap(tenant, json.dumps(record).encode())
        inner.write(doc_key, ring._wrap(tenant, key, new_key))
        done += 1
    return done
