"""Uploads: streamed to disk under the cap, validated line by line, published atomically, within the tenant's quota."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from llmaas.app.errors import Forbidden, InvalidRequest, PayloadTooLarge
from llmaas.training.files import FileStore

ROW = b'{"prompt": "a", "completion": "b"}\n'


def leftovers(store: FileStore) -> list[str]:
    """Keys that no listed file accounts for (a half-published upload)."""
    listed = {f"files/{f.id}{suffix}" for f in store.list() for suffix in (".json", ".jsonl")}
    return sorted(set(store.storage.list("")) - listed)


def test_an_upload_is_streamed_validated_and_published(tmp_path):
    store = FileStore(tmp_path)
    obj = store.create(io.BytesIO(ROW * 3000), "t.jsonl", "fine-tune", owner="alice", max_bytes=1 << 20)
    assert obj.rows == 3000 and obj.bytes == len(ROW) * 3000
    assert Path(store.data_url(obj.id, "alice")).read_bytes() == ROW * 3000
    assert leftovers(store) == []


@pytest.mark.parametrize("data, max_bytes, error, fragment", [
    (ROW * 100_000, 1 << 20, PayloadTooLarge, "exceeds 1048576 bytes"),  # 3.5 MB: stops at the cap
    (ROW + b"{oops\n", None, InvalidRequest, "t.jsonl:2: invalid JSON"),
    (b"", None, InvalidRequest, "no rows"),
])
def test_a_refused_upload_leaves_nothing_behind(tmp_path, data, max_bytes, error, fragment):
    store = FileStore(tmp_path)
    with pytest.raises(error, match=fragment):
        store.create(io.BytesIO(data), "t.jsonl", "fine-tune", owner="alice", max_bytes=max_bytes)
    assert store.list() == [] and leftovers(store) == []


def test_each_tenant_has_a_quota_of_files_and_bytes(tmp_path):
    store = FileStore(tmp_path, max_files_per_tenant=2, max_bytes_per_tenant=len(ROW) * 10)
    first = store.create(io.BytesIO(ROW * 4), "a.jsonl", "fine-tune", owner="alice")
    with pytest.raises(Forbidden, match="bytes") as err:
        store.create(io.BytesIO(ROW * 7), "b.jsonl", "fine-tune", owner="alice")  # 4 + 7 rows > 10 rows of bytes
    assert err.value.code == "quota_exceeded" and err.value.status_code == 403
    store.create(io.BytesIO(ROW * 6), "b.jsonl", "fine-tune", owner="alice")
    with pytest.raises(Forbidden, match="2 of 2 files"):
        store.create(io.BytesIO(ROW), "c.jsonl", "fine-tune", owner="alice")
    store.create(io.BytesIO(ROW * 10), "b.jsonl", "fine-tune", owner="bob")  # bob's quota is his own
    store.delete(first.id, "alice")
    store.create(io.BytesIO(ROW), "c.jsonl", "fine-tune", owner="alice")  # deleting frees room
    assert leftovers(store) == []
