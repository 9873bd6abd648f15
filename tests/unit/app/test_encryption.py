"""Encryption at rest: what lands in storage is sealed, per-tenant data keys, a wrong key or altered bytes fail
with a message that says so, rotation re-wraps without rewriting data, Ray Train's filesystem seals too."""
from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest

from llmaas.app.adapter_cache import AdapterCache
from llmaas.app.model_source import base_model_info
from llmaas.app.registry import Registry
from llmaas.app.storage import (
    CorruptObject,
    EncryptedStorage,
    EncryptionKeyError,
    encrypted,
    open_location,
    open_storage,
)
from llmaas.app.storage.encrypted import DATA_KEYS, MAGIC, MASTER_KEY_FILE_ENV, PREVIOUS_KEY_FILE_ENV, new_master_key
from llmaas.deployments.cli import main as cli
from llmaas.engine import load_peft_adapter
from llmaas.training.files import FileStore
from tests.models import make_peft_adapter, tiny_llama

SECRET = b'{"prompt": "my card is 4111 1111 1111 1111", "completion": "noted"}\n'


@pytest.fixture
def key_files(tmp_path, monkeypatch):
    files = []
    for name in ("k1", "k2"):
        (tmp_path / name).write_text(new_master_key())
        files.append(tmp_path / name)
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(files[0]))
    return files


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, key_files) -> str:
    return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_root")


def stored(root: str) -> dict[str, bytes]:
    """Every object's raw bytes under ``root`` (what someone with the disk or the bucket sees)."""
    clear = open_storage(root).inner
    return {key: clear.read(key) for key in clear.list("")}


def test_objects_are_sealed_per_tenant_and_read_back(root):
    storage = open_storage(root, encrypt=True)
    assert isinstance(storage, EncryptedStorage)
    storage.for_tenant("acme").write("files/a.jsonl", SECRET)
    storage.for_tenant("bob").write("files/b.jsonl", SECRET)
    storage.write("registry/doc.json", b'{"adapters": {}}')
    assert open_storage(root).read("files/a.jsonl") == SECRET  # a fresh open finds the marker and decrypts
    raw = stored(root)
    for key, data in raw.items():
        assert b"4111" not in data and b"adapters" not in data, key
        if not key.startswith("encryption/"):
            assert data.startswith(MAGIC), key
    assert raw["files/a.jsonl"] != raw["files/b.jsonl"]
    docs = [json.loads(raw[k]) for k in raw if k.startswith(DATA_KEYS)]
    assert sorted(d["tenant"] for d in docs) == ["_system", "acme", "bob"]  # one data key per tenant
    assert all("wrapped" in d and len(d["master_key_id"]) == 16 for d in docs)


def test_wrong_or_missing_key_and_altered_bytes_fail_clearly(root, key_files, monkeypatch):
    open_storage(root, encrypt=True).for_tenant("acme").write("files/a.jsonl", SECRET)
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(key_files[1]))
    with pytest.raises(EncryptionKeyError, match="wrapped by master key .* this process has master key"):
        open_storage(root).read("files/a.jsonl")
    monkeypatch.delenv(MASTER_KEY_FILE_ENV)
    with pytest.raises(EncryptionKeyError, match="is encrypted: give this process its master key"):
        open_storage(root)
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(key_files[0]))
    storage = open_storage(root)
    blob = storage.inner.read("files/a.jsonl")
    storage.inner.write("files/a.jsonl", blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(CorruptObject, match="fails authentication"):
        storage.read("files/a.jsonl")
    storage.inner.write("files/a.jsonl", blob[:20])
    with pytest.raises(CorruptObject, match="truncated"):
        storage.read("files/a.jsonl")
    storage.write("files/c.jsonl", SECRET)
    storage.inner.write("files/d.jsonl", storage.inner.read("files/c.jsonl"))  # sealed bytes moved to another key
    with pytest.raises(CorruptObject, match="fails authentication"):
        storage.read("files/d.jsonl")
    storage.inner.write("files/e.jsonl", SECRET)  # planted in the clear
    with pytest.raises(CorruptObject, match="not encrypted"):
        storage.read("files/e.jsonl")


class FirstLookMissesMarker:
    def __init__(self, inner) -> None:
        self.inner, self.looked = inner, False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def exists(self, key: str) -> bool:
        if key == encrypted.MARKER and not self.looked:
            self.looked = True
            return False
        return self.inner.exists(key)


def test_a_root_with_clear_objects_is_not_turned_encrypted_but_a_racing_marker_is_fine(tmp_path, key_files):
    open_storage(str(tmp_path / "r")).write("files/a.jsonl", SECRET)
    with pytest.raises(EncryptionKeyError, match="already holds unencrypted objects"):
        open_storage(str(tmp_path / "r"), encrypt=True)
    assert not open_storage(str(tmp_path / "r")).encrypted

    first = open_storage(str(tmp_path / "s"), encrypt=True)  # a replica that marked the root and wrote
    first.write("registry/00000001.json", b"{}")
    late = FirstLookMissesMarker(open_location(str(tmp_path / "s")))  # another replica, its first look too early
    encrypted.enable_encryption(late)  # sees the objects, looks again, finds the marker: no error
    assert open_storage(str(tmp_path / "s")).read("registry/00000001.json") == b"{}"


def test_a_tenant_whose_data_key_is_gone_does_not_break_the_file_list(tmp_path, key_files, monkeypatch):
    files = FileStore(open_storage(str(tmp_path / "root"), encrypt=True))
    mine = files.create(io.BytesIO(SECRET), "a.jsonl", "fine-tune", owner="acme")
    theirs = files.create(io.BytesIO(SECRET), "b.jsonl", "fine-tune", owner="bob")
    files.storage.inner.delete(encrypted.Keyring.doc_key("bob"))  # bob's data shredded
    monkeypatch.setattr(encrypted, "_keyrings", {})  # a new process
    files = FileStore(str(tmp_path / "root"))
    assert [f.id for f in files.list("acme")] == [mine.id] and len(files.list()) == 2
    assert files.storage.read(f"files/{mine.id}.jsonl") == SECRET
    with pytest.raises(EncryptionKeyError, match="data key of tenant 'bob' is gone"):
        files.storage.read(f"files/{theirs.id}.jsonl")


def test_rotation_rewraps_data_keys_and_rewrites_no_data(root, key_files, monkeypatch, capsys):
    old, new = key_files
    storage = open_storage(root, encrypt=True)
    for tenant in ("acme", "bob"):
        storage.for_tenant(tenant).write(f"files/{tenant}.jsonl", SECRET)
    data_before = {k: v for k, v in stored(root).items() if not k.startswith("encryption/")}
    # the rollout: every process gets the new key, and the old one as the previous key
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(new))
    monkeypatch.setenv(PREVIOUS_KEY_FILE_ENV, str(old))
    during = open_storage(root)
    assert during.read("files/acme.jsonl") == SECRET  # unwrapped with the previous key
    during.for_tenant("carol").write("files/carol.jsonl", SECRET)  # a new tenant's key: wrapped by the new one
    assert cli(["encryption", "status", "--storage-root", root]) == 0
    assert len(json.loads(capsys.readouterr().out)["wrapped_by"]) == 2
    assert cli(["encryption", "rotate", "--storage-root", root]) == 0
    assert "2 data keys re-wrapped" in capsys.readouterr().out  # acme and bob; carol's already was
    after = stored(root)
    assert {k: after[k] for k in data_before} == data_before  # no data rewritten
    monkeypatch.delenv(PREVIOUS_KEY_FILE_ENV)  # the rollout's end: the new key alone
    monkeypatch.setattr(encrypted, "_keyrings", {})  # (a new process: nothing unwrapped yet)
    assert open_storage(root).read("files/bob.jsonl") == SECRET
    assert cli(["encryption", "status", "--storage-root", root]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["data_keys"] == 3 and status["wrapped_by"] == status["this_process_keys"]
    assert cli(["encryption", "rotate", "--storage-root", root]) == 0
    assert "0 data keys re-wrapped" in capsys.readouterr().out  # a rerun (or a resumed one) skips what is done
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(old))  # a process left with the old key opens nothing
    monkeypatch.setattr(encrypted, "_keyrings", {})
    with pytest.raises(EncryptionKeyError, match="wrapped by master key"):
        open_storage(root).read("files/acme.jsonl")
    assert cli(["encryption", "status", "--storage-root", root]) == 1
    assert "which this process does not have" in capsys.readouterr().err


def test_ray_train_filesystem_seals_and_ships_without_the_key(root, tmp_path, key_files):
    import pyarrow.fs

    storage = open_storage(root, encrypt=True).for_tenant("acme")
    fs, base = storage.arrow_filesystem()
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "state.json").write_bytes(SECRET)
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    pyarrow.fs.copy_files(str(src), f"{base}/ray_runs/c1", source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)
    raw = stored(root)
    state = raw["ray_runs/c1/state.json"]
    assert state.startswith(MAGIC + b"\0\4acme") and b"4111" not in state
    shipped = pickle.dumps(fs)  # what Ray sends to the Train workers: the root and the tenant, no key
    assert key_files[0].read_text().encode() not in shipped and len(shipped) < 1000
    out = tmp_path / "back"
    pyarrow.fs.copy_files(f"{base}/ray_runs/c1", str(out), source_filesystem=pickle.loads(shipped),
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    assert (out / "state.json").read_bytes() == SECRET and (out / "sub" / "w.bin").read_bytes() == b"\0" * 1000


def test_adapters_on_an_encrypted_root_load_from_memory(tmp_path, key_files):
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    info = base_model_info(str(tmp_path / "model"), max_rank=16)
    src = make_peft_adapter(model, tmp_path / "a", seed=1)
    reg = Registry(open_storage(str(tmp_path / "root"), encrypt=True))
    version = reg.version("a", int(reg.register("a", src, info, owner="acme").split("@")[1]))
    raw = stored(str(tmp_path / "root"))
    weights = raw[f"{version.path}/adapter_model.safetensors"]
    assert weights.startswith(MAGIC + b"\0\4acme") and b"lora_A" not in weights and b"dtype" not in weights
    cache = AdapterCache(reg.storage, tmp_path / "cache", max_bytes=1 << 30)
    files = cache.source(version)
    assert isinstance(files, dict) and not (tmp_path / "cache").exists()  # nothing decrypted on disk
    assert hashlib.sha256(files["adapter_model.safetensors"]).hexdigest() == version.files["adapter_model.safetensors"]
    from_memory = load_peft_adapter(files, "a@1", num_layers=info.num_layers, max_rank=16)
    from_dir = load_peft_adapter(src, "a@1", num_layers=info.num_layers, max_rank=16)
    assert from_memory.weights.keys() == from_dir.weights.keys() and from_memory.scale == from_dir.scale
    assert all((from_memory.weights[k][0] == from_dir.weights[k][0]).all() for k in from_dir.weights)
