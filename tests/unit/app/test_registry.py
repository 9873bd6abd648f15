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
