"""Storage in an object store through fsspec: S3 (and S3-compatible servers) via s3fs, GCS via gcsfs.

S3 is tested against a real S3-compatible server (moto); gs:// is written to the
same gcsfs calls but untested here.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import fsspec

from llmaas.app.storage.base import StorageUnavailable, check_key, download_into, join_key, local_files, under

try:  # s3fs's client; gcsfs raises OSErrors of its own
    from botocore.exceptions import BotoCoreError
except ImportError:  # pragma: no cover - only without s3fs installed
    class BotoCoreError(Exception):
        pass

if TYPE_CHECKING:
    import pyarrow.fs

# scheme -> (fsspec protocol, the package that implements it, the first version with create-only writes)
BACKENDS = {"s3": ("s3", "s3fs", "2025.7.0"), "gs": ("gcs", "gcsfs", "2024.12.0"), "gcs": ("gcs", "gcsfs", "2024.12.0")}
# S3 answers 409 ConditionalRequestConflict while another conditional write to the key is in flight; retrying
# then resolves to 412 (it exists) or success.
CONFLICT_RETRIES = 5


def _error_code(error: BaseException) -> str:
    """The S3 error code behind an fsspec OSError ("" if it did not come from botocore)."""
    response = getattr(error.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def _reachable(method):
    """botocore's connection errors are not OSErrors: callers get StorageUnavailable (an OSError) instead."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{self.uri}: the object store is unreachable ({exc}); retry") from exc
    return wrapper


def _translate_errors(cls):
    for name in ("read", "write", "create", "exists", "list", "delete", "upload_file", "upload_dir", "download_dir"):
        setattr(cls, name, _reachable(getattr(cls, name)))
    return cls


@_translate_errors
class ObjectStorage:
    """Keys as objects under ``scheme://bucket/prefix``.

    Credentials, region and endpoint come only from the standard environment or
    the instance role (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``), read when the storage is opened. No cache is kept, so
    every ``list`` and ``exists`` asks the store and sees other processes' writes.

    Args:
        uri: ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (gs is untested).

    Raises:
        ValueError: The URI has no bucket, an unsupported scheme, or a bad prefix.
        ImportError: The fsspec backend for the scheme is not installed.
    """

    encrypted = False

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        if parts.scheme not in BACKENDS:
            raise ValueError(f"storage URI {uri!r}: unsupported scheme; use s3:// or gs://")
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"storage URI {uri!r}: give it as {parts.scheme}://bucket[/prefix]")
        prefix = check_key(parts.path.strip("/"), allow_root=True)
        self.uri = f"{parts.scheme}://{parts.netloc}" + (f"/{prefix}" if prefix else "")
        self._root = f"{parts.netloc}/{prefix}" if prefix else parts.netloc
        self._s3 = parts.scheme == "s3"
        # pyarrow does not read AWS_ENDPOINT_URL itself, so both clients get it from here and agree.
        self._endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")) \
            if self._s3 else None
        self._region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        protocol, package, version = BACKENDS[parts.scheme]
        # No instance or listings cache: another process's write must show up in the next list()/exists().
        options = {"skip_instance_cache": True, "use_listings_cache": False}
        if self._endpoint:
            options["endpoint_url"] = self._endpoint
        try:
            self._fs = fsspec.filesystem(protocol, **options)
        except ImportError as e:
            raise ImportError(f"storage {uri!r} needs {package}: pip install '{package}>={version}'") from e

    def _path(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    def read(self, key: str) -> bytes:
        return self._fs.cat_file(self._path(key))

    def write(self, key: str, data: bytes) -> None:
        # One PUT (or one completed multipart upload past 100 MB): S3 shows the old object or the new one.
        self._fs.pipe_file(self._path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        attempt = 0
        while True:
            try:
                # s3fs sends PutObject with IfNoneMatch="*"; gcsfs sends ifGenerationMatch=0.
                self._fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except TypeError as e:
                if "mode" not in str(e):
                    raise
                package, version = BACKENDS[self.uri.partition(":")[0]][1:]
                raise NotImplementedError(f"{package} is too old to write conditionally; "
                                          f"pip install '{package}>={version}'") from e
            except OSError as e:
                code = _error_code(e)
                if code in ("PreconditionFailed", "412"):  # S3-compatibles that send no Condition field
                    return False
                if code not in ("ConditionalRequestConflict", "409") or attempt == CONFLICT_RETRIES:
                    raise
            attempt += 1
            time.sleep(0.05 * 2**attempt)

    def exists(self, key: str) -> bool:
        try:
            return self._fs.info(self._path(key))["type"] == "file"
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        check_key(prefix, allow_root=True)
        parent, _, name = prefix.rpartition("/")
        base = f"{self._root}/{parent}" if parent else self._root
        self._fs.invalidate_cache(base)
        # One server-side listing of "parent/name*"; under() then drops siblings such as "nameX".
        found = self._fs.find(base, prefix=name) if name else self._fs.find(base)
        keys = []
        for path in found:
            key = path[len(self._root) + 1:]
            try:
                check_key(key)
            except ValueError:  # directory markers ("a/") and hidden objects are not keys
                continue
            if under(key, prefix):
                keys.append(key)
        return sorted(keys)

    def delete(self, key_or_prefix: str) -> None:
        check_key(key_or_prefix)
        keys = self.list(key_or_prefix)
        if keys:
            self._fs.rm([self._path(k) for k in keys])

    def upload_file(self, local_file: Path, key: str) -> None:
        if not Path(local_file).is_file():
            raise FileNotFoundError(f"{local_file} is not a file; give the file to upload")
        self._fs.put_file(str(local_file), self._path(key))

    def upload_dir(self, local_dir: Path, prefix: str) -> None:
        check_key(prefix, allow_root=True)
        files = local_files(Path(local_dir))
        if files:
            # Each file is its own PUT, so each object appears whole or not at all; the set is not atomic.
            self._fs.put([str(src) for src, _ in files], [self._path(join_key(prefix, rel)) for _, rel in files])

    def download_dir(self, prefix: str, local_dir: Path) -> None:
        def fetch(pairs: list[tuple[str, Path]]) -> None:
            self._fs.get([self._path(key) for key, _ in pairs], [str(dst) for _, dst in pairs])

        download_into(self, prefix, local_dir, fetch)

    def url(self, key: str = "") -> str:
        return f"{self.uri}/{check_key(key)}" if key else self.uri

    def local_path(self, key: str = "") -> Path | None:
        return None

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs  # pyarrow comes with ray[train]; kept off the import path of callers that never train

        if not self._s3:
            return pyarrow.fs.GcsFileSystem(), self._root
        options = {}
        if self._endpoint:
            options["endpoint_override"] = self._endpoint
        if self._region:
            options["region"] = self._region
        return pyarrow.fs.S3FileSystem(**options), self._root

    def for_tenant(self, tenant: str | None) -> ObjectStorage:
        return self  # clear: one storage for every tenant
