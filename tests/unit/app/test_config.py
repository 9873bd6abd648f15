"""AppConfig edge: dtype resolution and the limits' validation."""
from __future__ import annotations

import pydantic
import pytest
import torch

from llmaas.app.config import EngineSettings
from llmaas.deployments.config import AppConfig
from llmaas.engine.dtype_probe import choose, speedup_dtype


def test_the_cpu_dtype_rule_takes_bf16_only_when_clearly_faster():
    assert choose(fp32_s=1.0, bf16_s=0.25) == torch.bfloat16  # 4x: the AMD EPYC case
    assert choose(fp32_s=1.0, bf16_s=1.8) == torch.float32  # 0.56x: the Intel Xeon case
    assert choose(fp32_s=1.0, bf16_s=0.9) == torch.float32  # 1.1x: noise; exact parity wins


def test_auto_dtype_on_cpu_is_what_the_probe_timed(monkeypatch):
    """auto follows the timings (injected here: the machine's own are noise to a test), whatever the CPU flags."""
    from llmaas.engine import dtype_probe

    for fp32_s, bf16_s, expected in ((1.0, 0.25, torch.bfloat16), (1.0, 1.8, torch.float32)):
        timings = {torch.float32: fp32_s, torch.bfloat16: bf16_s}
        monkeypatch.setattr(dtype_probe, "linear_timer", lambda dtype, t=timings: lambda: t[dtype])
        dtype_probe.fastest_cpu_dtype.cache_clear()
        assert EngineSettings(device="cpu").to_engine_config(256, (2,)).dtype == expected
    dtype_probe.fastest_cpu_dtype.cache_clear()
    assert EngineSettings(device="cpu", dtype="float32").to_engine_config(256, (2,)).dtype == torch.float32
    assert EngineSettings(device="cuda").resolved_dtype("cuda") == "bfloat16"


def test_a_quantized_models_dtype_weighs_every_probed_batch():
    assert speedup_dtype([1.0, 1.0], [0.5, 0.5]) == torch.bfloat16
    assert speedup_dtype([0.69, 2.02], [1.05, 2.29]) == torch.float32  # int4 on the AMD EPYC where dense bf16 is 2.7x
    assert speedup_dtype([1.0, 4.0], [0.5, 6.0]) == torch.float32  # 2x at one batch, 0.67x at the other: 1.15x
    assert speedup_dtype([1.0, 4.0], [0.5, 2.9]) == torch.bfloat16  # 2x and 1.38x: 1.66x


def test_auto_dtype_of_a_quantized_model_is_what_its_layer_probe_timed(monkeypatch, tmp_path):
    """Quantized: the layer probe decides (the dense GEMM probe, which would say bf16, is not asked); the layer
    probe gets the model's path and the engine's kernel cache file."""
    from llmaas.engine import dtype_probe
    from tests.models import tiny_llama

    path = str(tmp_path / "m")
    tiny_llama().save_pretrained(path)
    monkeypatch.setattr(dtype_probe, "linear_timer", lambda dtype: lambda: {torch.float32: 1.0,
                                                                             torch.bfloat16: 0.25}[dtype])
    seen = []
    for fp32_s, bf16_s, expected in (([1.0, 1.0], [1.5, 1.1], torch.float32), ([1.0, 1.0], [0.4, 0.5],
                                                                                  torch.bfloat16)):
        timings = {torch.float32: fp32_s, torch.bfloat16: bf16_s}

        def timer(model_path, dtype, quantization, group_size, kernel_cache_file=None, max_num_seqs=16, t=timings):
            seen.append((model_path, quantization, group_size, kernel_cache_file, max_num_seqs))
            return lambda: t[dtype]
        monkeypatch.setattr(dtype_probe, "layer_timer", timer)
        dtype_probe.fastest_quantized_dtype.cache_clear()
        dtype_probe.fastest_cpu_dtype.cache_clear()
        settings = EngineSettings(device="cpu", quantization="int4", quant_group_size=64, max_num_seqs=8)
        assert settings.to_engine_config(256, (2,), None, "k.json", path).dtype == expected
    assert seen[0] == (path, "int4", 64, "k.json", 8)
    assert EngineSettings(device="cpu", quantization="int4").to_engine_config(256, (2,)).dtype == torch.bfloat16

    def broken(*args, **kwargs):
        raise ValueError("a model the probe cannot cut down")
    monkeypatch.setattr(dtype_probe, "layer_timer", broken)  # the replica still starts: the dense probe decides
    dtype_probe.fastest_quantized_dtype.cache_clear()
    assert EngineSettings(device="cpu", quantization="int8").to_engine_config(256, (2,), None, None, path).dtype \
        == torch.bfloat16
    dtype_probe.fastest_quantized_dtype.cache_clear()
    dtype_probe.fastest_cpu_dtype.cache_clear()


@pytest.mark.parametrize("quantization,tied", [("int8", False), ("int4", True)])
def test_the_layer_probe_runs_the_models_own_layers_through_the_engine(tmp_path, quantization, tied):
    """The probe is the engine on the model's shapes (its kernel plans land in the engine's cache file), at
    batches the replica admits, and leaves the requests' RNG as it was."""
    from llmaas.engine import dtype_probe
    from tests.models import tiny_llama

    path = str(tmp_path / "m")
    tiny_llama(hidden_size=128, intermediate_size=256, tie_word_embeddings=tied).save_pretrained(path)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seconds = dtype_probe.layer_timer(path, torch.bfloat16, quantization, 32, str(tmp_path / "kernels.json"))
    times = seconds()
    assert torch.equal(torch.get_rng_state(), state)
    assert len(times) == len(dtype_probe.PROBE_BATCHES) and all(0 < t < 5 for t in times)
    plans = (tmp_path / "kernels.json").read_text()
    assert f"{quantization}:256x128:" in plans and f"{quantization}:128x256:" in plans  # q|k|v fused; down_proj
    kernels = str(tmp_path / "kernels.json")  # plans measured once, as a replica's restarts find them
    assert len(dtype_probe.layer_timer(path, torch.float32, quantization, 32, kernels, max_num_seqs=4)()) == 2
    assert dtype_probe.fastest_quantized_dtype(path, quantization, 32, None, kernels, rounds=1) in (torch.float32,
                                                                                                  torch.bfloat16)


def test_limits_validate():
    cfg = AppConfig.model_validate({"rate_limits": {"requests_per_minute": 60, "tenants": {"trial": 5, "ops": None}},
                                    "request_timeout_s": None})
    assert cfg.rate_limits.limit_for("trial") == 5 and cfg.rate_limits.limit_for("ops") is None
    assert cfg.rate_limits.limit_for("anyone") == 60 and cfg.request_timeout_s is None
    assert AppConfig().request_timeout_s == 600 and AppConfig().rate_limits.requests_per_minute is None
    for bad in ({"rate_limits": {"requests_per_minute": 0}}, {"request_timeout_s": -1},
                {"rate_limits": {"tenants": {"trial": 0}}}, {"rate_limits": {"burst": 3}}):
        with pytest.raises(pydantic.ValidationError):
            AppConfig.model_validate(bad)


def test_quantization_reaches_the_engine_with_the_default_models_gguf():
    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import resolve_model

    model = resolve_model(ModelSettings())
    config = model.engine_config(EngineSettings(device="cpu", dtype="float32", quantization="int4",
                                                quant_group_size=64))
    assert (config.quantization, config.quant_group_size) == ("int4", 64)
    assert config.gguf_file is not None and config.gguf_file.endswith(".gguf")
    assert config.kernel_cache_file == str(ModelSettings().cache_dir / "kernels.json")
    for bad in ({"quantization": "int3"}, {"quant_group_size": 48}):
        with pytest.raises(pydantic.ValidationError):
            AppConfig.model_validate({"engine": bad})
