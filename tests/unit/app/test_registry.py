"""Publishing an adapter version survives a crash at any point, and only a validated copy is ever published."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llmaas.app.adapter_cache import AdapterCache
from llmaas.app.errors import InvalidRequest
from llmaas.app.model_source import base_model_info
from llmaas.app.registry import ADAPTER_FILES, Registry, RegistryState, sha256_file
from llmaas.app.storage import StorageUnavailable
from tests.models import make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = tiny_llama(seed=0)
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d / "model", safe_serialization=True)
    return model, base_model_info(str(d / "model"), max_rank=16), make_peft_adapter(model, d / "adapter", seed=1)


def published(reg: Registry, model: str) -> list[str]:
    name, version = model.split("@")
    return sorted(k.rsplit("/", 1)[1] for k in reg.storage.list(reg.version(name, int(version)).path))


def test_a_failed_registry_write_leaves_the_name_usable(base, tmp_path, monkeypatch):
    _model, info, adapter = base
    reg = Registry(tmp_path)
    assert reg.register("mood", adapter, info) == "mood@1"

    def disk_full(key, data):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the copy is uploaded when the registry commit fails
        m.setattr(reg.storage, "create", disk_full)
        with pytest.raises(OSError, match="No space left"):
            reg.register("mood", adapter, info)
    assert sorted(reg.load().adapters["mood"].versions) == [1]  # the registry never saw @2
    only_v1 = reg.version("mood", 1).path
    assert {k.rsplit("/", 1)[0] for k in reg.storage.list("adapters")} == {only_v1}  # and its upload is gone
    assert reg.register("mood", adapter, info) == "mood@2"  # the next publish succeeds
    assert published(reg, "mood@2") == ["adapter_config.json", "adapter_model.safetensors", "metadata.json"]


def test_a_publish_cut_off_before_the_commit_is_never_served(base, tmp_path):
    """A process killed between uploading the copy and committing the registry leaves an unlisted directory: no
    version names it, and the next publish of that name goes to a fresh key with every file checksummed."""
    _model, info, adapter = base
    reg = Registry(tmp_path)
    reg.storage.write("adapters/mood/cut-off/adapter_model.safetensors", b"half a file")
    assert reg.register("mood", adapter, info) == "mood@1"
    version = reg.version("mood", 1)
    assert version.path != "adapters/mood/cut-off" and sorted(version.files) == sorted(ADAPTER_FILES)
    assert version.files["adapter_model.safetensors"] == sha256_file(Path(adapter) / "adapter_model.safetensors")


def test_a_registry_written_before_generations_is_read_and_carried_on(base, tmp_path):
    _model, info, adapter = base
    (tmp_path / "registry.json").write_text(RegistryState(generation=7).model_dump_json())
    reg = Registry(tmp_path)
    assert reg.load().generation == 7
    reg.register("mood", adapter, info)
    assert reg.load().generation == 8 and "mood" in reg.load().adapters


def test_an_adapter_whose_matrices_do_not_have_its_rank_is_refused(base, tmp_path):
    _model, info, adapter = base
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    key = next(k for k in tensors if ".lora_A." in k)
    tensors[key] = tensors[key][:4].contiguous()  # rank 4 rows where the config says r=8
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((Path(adapter) / "adapter_config.json").read_text())
    assert json.loads((bad / "adapter_config.json").read_text())["r"] == 8
    reg = Registry(tmp_path / "store")
    with pytest.raises(InvalidRequest, match="do not have the rank r=8"):
        reg.register("mood", bad, info)
    assert "mood" not in reg.load().adapters and reg.storage.list("adapters") == []


def test_a_canary_splits_traffic_by_its_share(base, tmp_path):
    """10,000 draws from a seeded source: the canary's share lands within 4.4 standard deviations of 0.3."""
    import random

    from llmaas.app.catalog import ModelCatalog

    _model, info, adapter = base
    reg = Registry(tmp_path)
    reg.register("mood", adapter, info)
    reg.register("mood", adapter, info)
    reg.promote("mood", 1)
    state = reg.promote("mood", 2, canary_share=0.3)
    catalog = ModelCatalog("tiny", 256, state, rng=random.Random(1234))
    draws = [catalog.resolve("mood") for _ in range(10_000)]
    assert set(draws) == {"mood@1", "mood@2"}
    assert abs(draws.count("mood@2") / len(draws) - 0.3) < 0.02
    assert {catalog.resolve("mood@1") for _ in range(100)} == {"mood@1"}  # a version named is never split


def _register_many(root: str, model_dir: str, adapter: str, count: int, go) -> list[str]:
    go.wait(30)  # both processes start writing at once
    info = base_model_info(model_dir, max_rank=16)
    return [Registry(root).register("mood", adapter, info) for _ in range(count)]


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path) -> str:
    """A local storage root, or one on the S3-compatible test server."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_root")


def test_writers_in_two_processes_lose_no_version(base, any_root):
    """Compare-and-set holds across processes (two Routers, a job publisher), on a disk and on S3: 2 x 6
    concurrent registrations of one name give versions 1..12, each listed once with its files, and one
    generation step per write."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _model, info, adapter = base
    model_dir = str(Path(adapter).parent / "model")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        go = manager.Event()
        futures = [pool.submit(_register_many, any_root, model_dir, adapter, 6, go) for _ in range(2)]
        go.set()
        ids = [v for f in futures for v in f.result(timeout=120)]
    assert sorted(ids, key=lambda v: int(v.split("@")[1])) == [f"mood@{i}" for i in range(1, 13)]
    reg = Registry(any_root)
    state = reg.load()
    assert sorted(state.adapters["mood"].versions) == list(range(1, 13)) and state.generation == 12
    assert all(published(reg, f"mood@{i}") == sorted(ADAPTER_FILES) for i in range(1, 13))


def test_a_server_dying_mid_publish_names_nothing(base, s3_root, open_via_dying_server, tmp_path):
    """The bucket's endpoint goes away while the adapter's weights are uploading: register fails with a
    StorageUnavailable (a 503 at the API), the registry names no version, and the next publish is complete."""
    _model, info, adapter = base
    weights = (Path(adapter) / "adapter_model.safetensors").stat().st_size
    doomed, died = open_via_dying_server(die_after_bytes=weights // 2)
    with pytest.raises(StorageUnavailable):
        Registry(doomed).register("mood", adapter, info)
    assert died.is_set()
    reg = Registry(s3_root)  # the same bucket, reached directly
    assert "mood" not in reg.load().adapters
    assert reg.register("mood", adapter, info) == "mood@1"
    cache = AdapterCache(reg.storage, tmp_path / "cache", max_bytes=1 << 30)
    assert sorted(p.name for p in cache.path(reg.version("mood", 1)).iterdir()) == sorted(ADAPTER_FILES)
