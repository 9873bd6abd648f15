"""Publishing an adapter version survives a crash at any point, and only a validated copy is ever published."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llmaas.app import registry as registry_module
from llmaas.app.errors import InvalidRequest
from llmaas.app.model_source import base_model_info
from llmaas.app.registry import Registry
from tests.models import make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = tiny_llama(seed=0)
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d / "model", safe_serialization=True)
    return model, base_model_info(str(d / "model"), max_rank=16), make_peft_adapter(model, d / "adapter", seed=1)


def test_a_failed_registry_write_leaves_the_name_usable(base, tmp_path, monkeypatch):
    _model, info, adapter = base
    reg = Registry(tmp_path)
    assert reg.register("mood", adapter, info) == "mood@1"

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the adapter is already renamed into place when the registry write fails
        m.setattr(registry_module, "atomic_write", disk_full)
        with pytest.raises(OSError, match="No space left"):
            reg.register("mood", adapter, info)
    assert sorted(reg.load().adapters["mood"].versions) == [1]  # the registry never saw @2
    assert reg.register("mood", adapter, info) == "mood@2"  # and the next publish succeeds
    assert sorted(p.name for p in reg.adapter_dir("mood", 2).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metadata.json"]


def test_a_publish_cut_off_after_the_copy_is_replaced(base, tmp_path):
    """A process killed between moving the copy into place and writing the registry leaves an unlisted directory;
    the next publish of that name takes its place instead of failing forever."""
    _model, info, adapter = base
    reg = Registry(tmp_path)
    orphan = reg.adapter_dir("mood", 1)
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"half a file")
    assert reg.register("mood", adapter, info) == "mood@1"
    published = load_file(str(reg.adapter_dir("mood", 1) / "adapter_model.safetensors"))
    assert published.keys() == load_file(str(Path(adapter) / "adapter_model.safetensors")).keys()


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
    assert "mood" not in reg.load().adapters and not (tmp_path / "store" / "adapters").exists()


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
    return [Registry(Path(root)).register("mood", adapter, info) for _ in range(count)]


def test_writers_in_two_processes_lose_no_version(base, tmp_path):
    """The registry lock holds across processes (two Routers, a job publisher): 2 x 6 concurrent registrations
    of one name give versions 1..12, each listed once with its files, and one generation step per write."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _model, info, adapter = base
    model_dir = str(Path(adapter).parent / "model")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        go = manager.Event()
        futures = [pool.submit(_register_many, str(tmp_path), model_dir, adapter, 6, go) for _ in range(2)]
        go.set()
        ids = [v for f in futures for v in f.result(timeout=120)]
    assert sorted(ids, key=lambda v: int(v.split("@")[1])) == [f"mood@{i}" for i in range(1, 13)]
    state = Registry(tmp_path).load()
    assert sorted(state.adapters["mood"].versions) == list(range(1, 13)) and state.generation == 12
    assert all((tmp_path / "adapters" / "mood" / str(i) / "adapter_model.safetensors").exists() for i in range(1, 13))
