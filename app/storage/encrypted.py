"""Encryption at rest: envelope encryption over any ``Storage`` (AES-256-GCM from ``cryptography``).

A storage root is encrypted once it holds the marker object ``encryption/root.json``; every process that
opens it (``open_storage``) then reads and writes through ``EncryptedStorage`` and needs the master key,
from ``LLMAAS_MASTER_KEY_FILE`` (a file holding the key in base64) or ``LLMAAS_MASTER_KEY`` (the base64
text), and during a rotation also the old one (``LLMAAS_PREVIOUS_MASTER_KEY_FILE``), which only unwraps.
A root without the marker stays in the clear, so roots never mix the two.

* Each tenant has its own 256-bit data key, made on its first write, stored at
  ``encryption/data-keys/<sha256(tenant)>.json`` wrapped (AES-GCM) by the master key together with the
  master key's id. Rotating the master key (``rotate_master_key``) re-wraps these few objects and rewrites
  no data. Tenant names are in the clear (in each object's header and data-key record).
* Every object is ``MAGIC | tenant | nonce | AES-GCM(data key, plaintext)``; the object's key is
  authenticated data, so bytes moved to another key, or altered, fail to decrypt with an error that says
  so (``CorruptObject``). A wrong master key is named as such (its id differs from the one that wrapped the
  data key: ``EncryptionKeyError``), never decrypted into garbage. An older sealed copy of the same key would
  read as valid: the service never rewrites an adapter, file or checkpoint key.
* Nothing is decrypted to disk by this module except ``download_dir`` (asked for by name); adapters are
  served from ``read()`` bytes, training files are parsed from ``read()`` bytes, uploads are spooled in memory.
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
PREVIOUS_KEY_ENV = "LLMAAS_PREVIOUS_MASTER_KEY"  # during a rotation: unwraps, never wraps
PREVIOUS_KEY_FILE_ENV = "LLMAAS_PREVIOUS_MASTER_KEY_FILE"
MARKER = "encryption/root.json"
DATA_KEYS = "encryption/data-keys"
MAGIC = b"LLMAASE1"
SYSTEM = "_system"  # the data key of objects no tenant owns (registry, job records, usage, audit)
_NONCE = 12


class EncryptionKeyError(StorageUnavailable):
    """The storage cannot be read with the keys this process has: no master key, or a wrong one (the operator's
    to fix; a 503 to clients, like any storage out of reach)."""


class CorruptObject(OSError):
    """A stored object is not what was sealed there: altered, truncated, copied from another key, or written in
    the clear into an encrypted root."""


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


def master_key_from_env(file_env: str = MASTER_KEY_FILE_ENV, text_env: str = MASTER_KEY_ENV) -> bytes | None:
    """The master key this process was given (``*_FILE`` first, then the base64 text), or None."""
    if path := os.environ.get(file_env):
        try:
            return parse_master_key(Path(path).expanduser().read_bytes(), f"{file_env}={path}")
        except OSError as exc:
            raise EncryptionKeyError(f"{file_env}={path}: cannot read the key file ({exc})") from None
    if text := os.environ.get(text_env):
        return parse_master_key(text, text_env)
    return None


def previous_key_from_env() -> bytes | None:
    """The key being rotated away from, while a rotation is under way."""
    return master_key_from_env(PREVIOUS_KEY_FILE_ENV, PREVIOUS_KEY_ENV)


def key_id(master_key: bytes) -> str:
    """A public name for a master key (not derivable back into it): how a wrong key is told apart."""
    return hashlib.sha256(b"llmaas master key id\0" + master_key).hexdigest()[:16]


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)


class Keyring:
    """A root's data keys, kept in this process's memory once unwrapped. New ones are wrapped by the master key;
    existing ones are unwrapped by whichever of the master and the previous key (during a rotation) wrapped them.
    A data key stays cached until the process ends, also if its object is deleted meanwhile."""

    def __init__(self, inner: Storage, master_key: bytes, previous_key: bytes | None = None) -> None:
        self.inner = inner
        self.master_key = master_key
        self.master_id = key_id(master_key)
        self._unwrapping = {key_id(k): k for k in (previous_key, master_key) if k is not None}
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

    def _wrap(self, tenant: str, key: bytes) -> bytes:
        return json.dumps({"tenant": tenant, "master_key_id": self.master_id, "created_at": int(time.time()),
                           "wrapped": base64.b64encode(_seal(self.master_key, key, _aad(tenant))).decode()}).encode()

    def _unwrap(self, tenant: str, doc: bytes) -> bytes:
        try:
            record = json.loads(doc)
            wrapped_by, wrapped = record["master_key_id"], base64.b64decode(record["wrapped"])
        except (ValueError, KeyError, TypeError):
            raise CorruptObject(f"{self.inner.uri}: tenant {tenant!r}'s data key object is damaged") from None
        master_key = self._unwrapping.get(wrapped_by)
        if master_key is None:
            raise EncryptionKeyError(
                f"{self.inner.uri}: tenant {tenant!r}'s data key is wrapped by master key {wrapped_by}, and this "
                f"process has master key {' and '.join(self._unwrapping)}: set {MASTER_KEY_FILE_ENV} to the key "
                f"this root was encrypted with (during a rotation, the old one as {PREVIOUS_KEY_FILE_ENV})")
        try:
            return _open(master_key, wrapped, _aad(tenant))
        except (InvalidTag, ValueError):
            raise CorruptObject(f"{self.inner.uri}: tenant {tenant!r}'s data key object was altered") from None

    def rewrap(self, doc_key: str) -> bool:
        """Re-wraps one data-key object under the master key; False if it already is."""
        doc = self.inner.read(doc_key)
        record = json.loads(doc)
        if record.get("master_key_id") == self.master_id:
            return False
        tenant = record.get("tenant", "?")
        self.inner.write(doc_key, self._wrap(tenant, self._unwrap(tenant, doc)))
        return True


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
            raise CorruptObject(f"{self.uri}: object {key!r} is not encrypted, in a root that is: it was not "
                                "written by llmaas")
        (size,) = struct.unpack(">H", blob[len(MAGIC):len(MAGIC) + 2])
        end = len(MAGIC) + 2 + size
        if len(blob) < end + _NONCE + 16:  # nonce + GCM tag
            raise CorruptObject(f"{self.uri}: object {key!r} is truncated")
        tenant = blob[len(MAGIC) + 2:end].decode("utf-8", "replace")
        try:
            return _open(self.keyring.data_key(tenant, create=False), blob[end:], blob[:end] + key.encode())
        except (InvalidTag, ValueError):
            raise CorruptObject(f"{self.uri}: object {key!r} fails authentication: altered in storage or copied "
                                "from another key") from None

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

        handler = self.sealing_handler()
        return pyarrow.fs.PyFileSystem(handler), self.inner.arrow_filesystem()[1]

    def sealing_handler(self):
        """The pyarrow filesystem handler over the clear backend's filesystem that seals as this view."""
        fs, root = self.inner.arrow_filesystem()
        return _sealing_fs_class()(fs, root.rstrip("/"), self)


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
            """The storage key of ``path``: only paths below the root, never the keys' own folder."""
            path = path.rstrip("/")
            if not path.startswith(self.root + "/") or path[len(self.root) + 1:].split("/")[0] == "encryption":
                raise PermissionError(f"{path}: Ray Train may only use paths below {self.root}, not its keys")
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
            self._key(path)
            self.fs.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            self._key(path)
            self.fs.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self._key(path)
            self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise PermissionError("refusing to empty the root of an encrypted storage")

        def delete_file(self, path):
            self._key(path)
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
    return storage.for_tenant(tenant).sealing_handler()


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
        if self.closed:
            return
        try:  # closed whatever happens: a failed write is raised once, not retried by the garbage collector
            sealed = self.owner.storage.seal(self.owner._key(self.path), self.buffer.getvalue())
            self.owner.fs.create_dir(self.path.rpartition("/")[0], recursive=True)  # a local fs needs the parent
            with self.owner.fs.open_output_stream(self.path) as out:
                out.write(sealed)
        finally:
            super().close()


_keyrings: dict[tuple, Keyring] = {}  # one per root and keys in a process: each data key is unwrapped once
_keyrings_lock = threading.Lock()


def _keyring(root_id: str, inner: Storage) -> Keyring:
    master, previous = master_key_from_env(), previous_key_from_env()
    if master is None:
        raise EncryptionKeyError(f"storage root {inner.uri} is encrypted: give this process its master key "
                                 f"({MASTER_KEY_FILE_ENV}=path or {MASTER_KEY_ENV}=base64)")
    with _keyrings_lock:
        return _keyrings.setdefault((root_id, master, previous), Keyring(inner, master, previous))


def encrypted_view(inner: Storage, root_id: str) -> Storage:
    """``inner`` itself for a clear root; an ``EncryptedStorage`` over it for an encrypted one (the master key is
    required then: EncryptionKeyError names what is missing)."""
    if not inner.exists(MARKER):
        return inner
    return EncryptedStorage(inner, _keyring(root_id, inner))


def enable_encryption(inner: Storage) -> None:
    """Marks ``inner``'s root encrypted (idempotent; several processes may race to do it). A root that already
    holds clear objects is refused: they would stay readable to anyone with the disk, so encryption starts on a
    new root."""
    if master_key_from_env() is None:
        raise EncryptionKeyError(f"encryption at rest is on but no master key was given: set {MASTER_KEY_FILE_ENV} "
                                 f"(a file from `llmaas encryption new-key`) or {MASTER_KEY_ENV}")
    if inner.exists(MARKER):
        return
    if clear := [k for k in inner.list("") if not k.startswith("encryption/")]:
        if inner.exists(MARKER):  # another process marked it and wrote since our first look
            return
        raise EncryptionKeyError(f"storage root {inner.uri} already holds unencrypted objects ({clear[0]}, ...); "
                                 "point storage_root at a new, empty location to encrypt at rest")
    inner.create(MARKER, json.dumps({"version": 1, "cipher": "AES-256-GCM", "envelope": "per-tenant data keys",
                                     "created_at": int(time.time())}).encode())


def rotate_master_key(storage: EncryptedStorage) -> int:
    """Re-wraps every data key of ``storage``'s root that is not under its master key (unwrapping with the previous
    key), and no data. Passes repeat until one finds nothing left, so data keys made meanwhile by processes that
    still wrap with the old key are caught too. Returns how many were re-wrapped."""
    ring = Keyring(storage.inner, storage.keyring.master_key, previous_key_from_env())
    done = 0
    while changed := sum(ring.rewrap(doc_key) for doc_key in storage.inner.list(DATA_KEYS)):
        done += changed
    return done
