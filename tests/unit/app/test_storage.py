"""Both storage backends, local and S3 (a real S3-compatible server), pinned to one contract."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from llmaas.app.storage import LocalStorage, ObjectStorage, Storage, StorageUnavailable, open_storage

MB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    root = str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_root")
    return open_storage(root)


def test_write_then_read_returns_the_bytes(storage):
    storage.write("registry/gen-00000042.json", b'{"a": 1}')
    storage.write("registry/gen-00000042.json", b'{"a": 2}')
    assert storage.read("registry/gen-00000042.json") == b'{"a": 2}'
    assert storage.exists("registry/gen-00000042.json")
    assert not storage.exists("registry")  # a prefix is not an object


def test_reading_a_missing_key_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.read("registry/nope.json")
    assert not storage.exists("registry/nope.json")


def test_create_succeeds_once_and_never_overwrites(storage):
    assert storage.create("locks/job-1", b"first") is True
    assert storage.create("locks/job-1", b"second") is False
    assert storage.read("locks/job-1") == b"first"


def race_to_create(storage: Storage, key: str, writers: int = 8) -> dict[int, bool]:
    """``create(key)`` from ``writers`` threads released at once; each writer's result."""
    start = threading.Barrier(writers)
    results: dict[int, bool] = {}

    def contend(i: int) -> None:
        start.wait()
        results[i] = storage.create(key, f"writer {i}".encode())

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("round_", range(3))
def test_create_racing_from_8_threads_has_exactly_one_winner(storage, round_):
    results = race_to_create(storage, f"race/{round_}")
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1, results
    assert storage.read(f"race/{round_}") == f"writer {winners[0]}".encode()


def test_list_is_recursive_sorted_relative_and_respects_component_boundaries(storage):
    for key in ["a/z", "a/b/c", "a/b/a", "ab/c", "b"]:
        storage.write(key, b"x")
    assert storage.list("a") == ["a/b/a", "a/b/c", "a/z"]
    assert storage.list("a/b") == ["a/b/a", "a/b/c"]
    assert storage.list("") == ["a/b/a", "a/b/c", "a/z", "ab/c", "b"]
    assert storage.list("b") == ["b"]
    assert storage.list("missing") == []


def test_delete_removes_a_key_or_a_whole_prefix_and_ignores_missing(storage):
    for key in ["v/1/w", "v/1/x/y", "v/2/w", "v/10/w"]:
        storage.write(key, b"x")
    storage.delete("v/2/w")
    assert storage.list("v") == ["v/1/w", "v/1/x/y", "v/10/w"]
    storage.delete("v/1")
    assert storage.list("v") == ["v/10/w"]
    storage.delete("v/1")
    storage.delete("never/there")
    assert storage.list("v") == ["v/10/w"]


def test_upload_dir_then_download_dir_round_trips_the_bytes(storage, tmp_path):
    src = tmp_path / "src"
    files = {"adapter_config.json": b"{}", "weights/adapter.safetensors": os.urandom(300_000),
             "weights/deep/er/x.bin": os.urandom(10)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "link.bin").symlink_to(src / "adapter_config.json")  # symlinks are not uploaded
    (src / ".cache").mkdir()
    (src / ".cache" / "lock").write_bytes(b"")  # nor hidden files

    storage.upload_dir(src, "adapters/a1/v1")
    assert storage.list("adapters/a1/v1") == sorted(f"adapters/a1/v1/{rel}" for rel in files)

    dst = tmp_path / "dst" / "v1"
    dst.mkdir(parents=True)
    (dst / "stale.txt").write_bytes(b"from an older download")
    storage.download_dir("adapters/a1/v1", dst)
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == files
    assert sorted(os.listdir(dst.parent)) == ["v1"]  # no temp dirs left behind
    with pytest.raises(FileNotFoundError):
        storage.download_dir("adapters/none", tmp_path / "none")


def test_upload_file_stores_the_file_and_url_names_it_for_open_storage(storage, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_bytes(os.urandom(200_000))
    storage.upload_file(src, "files/file-1.jsonl")
    assert storage.read("files/file-1.jsonl") == src.read_bytes()
    parent, _, name = storage.url("files/file-1.jsonl").rpartition("/")
    assert open_storage(parent).read(name) == src.read_bytes()
    assert storage.url() == storage.uri


@pytest.mark.parametrize("key", ["..", "../x", "a/../../x", "/etc/passwd", "a//b", "a/", "", "a\\b", "./a", ".tmp"])
def test_keys_that_could_escape_or_are_malformed_are_refused(storage, key):
    with pytest.raises(ValueError):
        storage.write(key, b"x")
    with pytest.raises(ValueError):
        storage.read(key)
    with pytest.raises(ValueError):
        storage.create(key, b"x")


def test_a_symlink_out_of_the_local_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    storage = LocalStorage(tmp_path / "root")
    storage.write("ok", b"x")
    (tmp_path / "root" / "escape").symlink_to(outside)
    with pytest.raises(ValueError, match="escapes"):
        storage.read("escape/secret")
    with pytest.raises(ValueError, match="escapes"):
        storage.write("escape/new", b"x")
    assert not (outside / "new").exists()


def test_the_arrow_filesystem_writes_where_read_looks(storage):
    fs, root = storage.arrow_filesystem()
    fs.create_dir(f"{root}/checkpoints/epoch_0")  # on S3 an empty "dir/" marker object, which is not a key
    with fs.open_output_stream(f"{root}/checkpoints/epoch_0/state.pt") as f:
        f.write(b"checkpoint")
    assert storage.read("checkpoints/epoch_0/state.pt") == b"checkpoint"
    assert storage.list("checkpoints") == ["checkpoints/epoch_0/state.pt"]


@pytest.mark.parametrize("root, kind", [("/srv/llmaas", LocalStorage), ("file:///srv/llmaas", LocalStorage),
                                        ("relative/dir", LocalStorage), ("s3://bucket/prefix", ObjectStorage)])
def test_open_storage_picks_the_backend_from_the_root(root, kind):
    storage = open_storage(root)
    assert isinstance(storage, kind)
    assert storage.local_path() == (Path(root.removeprefix("file://")).absolute() if kind is LocalStorage else None)


@pytest.mark.parametrize("root", ["", "hdfs://x/y", "s3://", "s3:///prefix", "s3://bucket/../x"])
def test_open_storage_refuses_a_root_it_cannot_serve(root):
    with pytest.raises(ValueError):
        open_storage(root)


def test_a_server_dying_mid_write_raises_and_keeps_the_old_object(s3_root, open_via_dying_server):
    direct = open_storage(s3_root)
    direct.write("model/weights.bin", b"old weights")
    doomed, died = open_via_dying_server(die_after_bytes=1 * MB)
    with pytest.raises(StorageUnavailable):
        doomed.write("model/weights.bin", os.urandom(4 * MB))
    assert died.is_set()
    assert direct.read("model/weights.bin") == b"old weights"


def test_a_server_dying_mid_upload_dir_raises_and_leaves_no_partial_object(s3_root, open_via_dying_server,
                                                                            tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    files = {f"weights-{i}.bin": os.urandom(2 * MB) for i in range(5)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    doomed, died = open_via_dying_server(die_after_bytes=3 * MB)
    with pytest.raises(StorageUnavailable):
        doomed.upload_dir(src, "model")
    assert died.is_set()
    direct = open_storage(s3_root)
    stored = direct.list("model")
    assert len(stored) < len(files)
    for key in stored:  # each object the server kept is whole
        assert direct.read(key) == files[key.removeprefix("model/")]


def test_create_under_a_key_that_is_an_object_raises_rather_than_reporting_it_exists(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write("a", b"x")
    with pytest.raises(OSError):
        storage.create("a/b", b"y")
