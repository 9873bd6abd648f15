"""AppConfig edge: dtype resolution and the limits' validation."""
from __future__ import annotations

import pydantic
import pytest
import torch

from llmaas.app.config import EngineSettings
from llmaas.deployments.config import AppConfig
from llmaas.engine.dtype_probe import choose


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
