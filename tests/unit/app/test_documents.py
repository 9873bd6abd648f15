"""VersionedDocument: compare-and-set by create-only generation objects, on a disk and on S3."""
from __future__ import annotations

import json
import threading

import pytest

from llmaas.app.documents import KEEP, VersionedDocument
from llmaas.app.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    return open_storage(str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_root"))


def bump(content: bytes | None) -> tuple[bytes, int]:
    n = json.loads(content)["n"] + 1 if content else 1
    return json.dumps({"n": n}).encode(), n


def test_concurrent_increments_lose_nothing(storage):
    doc = VersionedDocument(storage, "counter")
    threads = [threading.Thread(target=lambda: [doc.update(bump) for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    generation, content = doc.read()
    assert json.loads(content)["n"] == 20 and generation == 20
    assert len(doc.generations()) <= KEEP + 1  # old generations are pruned


def test_a_change_that_raises_writes_nothing(storage):
    doc = VersionedDocument(storage, "doc")
    doc.update(bump)

    def refuse(_content):
        raise KeyError("no")

    with pytest.raises(KeyError):
        doc.update(refuse)
    assert doc.read()[0] == 1


def test_a_write_whose_answer_was_lost_is_not_applied_twice(tmp_path, monkeypatch):
    """A client retrying its own conditional PUT is told the key exists although the first try stored it: the
    writer recognises its own object instead of re-reading and applying the change again."""
    storage = open_storage(str(tmp_path))
    doc = VersionedDocument(storage, "doc")
    real_create = storage.create

    def create_then_lose_the_answer(key, data):
        real_create(key, data)
        return False

    monkeypatch.setattr(storage, "create", create_then_lose_the_answer)
    assert doc.update(bump) == 1
    assert doc.read() == (1, b'{"n": 1}')
