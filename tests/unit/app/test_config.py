"""AppConfig edge: dtype resolution and the limits' validation."""
from __future__ import annotations

import pydantic
import pytest
import torch

from llmaas.app.config import AppConfig, EngineSettings, cpu_has_native_bf16


def test_auto_dtype_on_cpu_follows_native_bf16_support():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert EngineSettings(device="cpu").to_engine_config(256, (2,)).dtype == expected
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
