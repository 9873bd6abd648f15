"""A replica's adapter cache: pulled from object storage once, checksummed, LRU by bytes; a local root is read
in place."""
from __future__ import annotations

import pytest

from llmaas.app.adapter_cache import AdapterCache, ChecksumMismatch
from llmaas.app.model_source import base_model_info
from llmaas.app.registry import Registry
from llmaas.engine import load_peft_adapter
from tests.models import make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    model = tiny_llama(seed=0)
    d = tmp_path_factory.mktemp("cachebase")
    model.save_pretrained(d / "model", safe_serialization=True)
    info = base_model_info(str(d / "model"), max_rank=16)
    return info, [make_peft_adapter(model, d / f"a{i}", seed=i) for i in range(3)]


def versions(reg: Registry, info, dirs) -> list:
    ids = [reg.register(f"c{i}", d, info) for i, d in enumerate(dirs)]
    return [reg.version(v.split("@")[0], 1) for v in ids]


def cached(cache: AdapterCache) -> int:
    return len([p for p in cache.cache_dir.iterdir() if not p.name.startswith(".")])


def test_versions_are_pulled_once_and_the_least_recently_used_is_evicted(adapters, s3_root, tmp_path):
    info, dirs = adapters
    v1, v2, v3 = versions(Registry(s3_root), info, dirs)
    size = sum(len(Registry(s3_root).storage.read(f"{v1.path}/{f}")) for f in v1.files)  # one version's bytes
    cache = AdapterCache(Registry(s3_root).storage, tmp_path / "cache", max_bytes=int(size * 2.5))
    p1 = cache.path(v1)
    assert cache.pulls == 1 and cache.path(v1) == p1 and cache.pulls == 1  # a second use pulls nothing
    assert load_peft_adapter(p1, "c0", num_layers=info.num_layers, max_rank=16).rank == 8  # the engine can load it
    cache.path(v2)
    cache.path(v1)  # v1 is now the most recently used
    cache.path(v3)  # three do not fit: v2 goes
    assert cached(cache) == 2 and cache.pulls == 3
    cache.path(v1)
    assert cache.pulls == 3
    cache.path(v2)
    assert cache.pulls == 4 and cached(cache) == 2


def test_a_file_changed_in_storage_is_refused(adapters, s3_root, tmp_path):
    info, dirs = adapters
    reg = Registry(s3_root)
    (v1, *_rest) = versions(reg, info, dirs[:1])
    reg.storage.write(f"{v1.path}/adapter_config.json", b'{"r": 8, "peft_type": "LORA"}')  # tampered after publish
    cache = AdapterCache(reg.storage, tmp_path / "cache", max_bytes=1 << 30)
    with pytest.raises(ChecksumMismatch, match="adapter_config.json"):
        cache.path(v1)
    assert cached(cache) == 0


def test_a_local_root_is_read_in_place(adapters, tmp_path):
    info, dirs = adapters
    reg = Registry(tmp_path / "root")
    (v1, *_rest) = versions(reg, info, dirs[:1])
    cache = AdapterCache(reg.storage, tmp_path / "cache", max_bytes=1)
    assert cache.path(v1) == reg.storage.local_path(v1.path) and cache.pulls == 0
