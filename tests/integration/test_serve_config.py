"""serve_config.yaml is a valid Serve deploy config whose deployments are the ones build_app() makes."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_validates_and_names_real_deployments():
    from ray.serve.schema import ServeDeploySchema

    from llmaas.deployments.builder import build_app
    from llmaas.deployments.config import AppConfig

    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app_spec = schema.applications[0]
    assert app_spec.import_path == "llmaas.deployments.builder:build_app"
    AppConfig.model_validate(app_spec.args)  # args are a valid AppConfig
    built = build_app(app_spec.args)
    names = {built._bound_deployment.name}
    names |= {a._bound_deployment.name for a in built._bound_deployment.init_args if hasattr(a, "_bound_deployment")}
    assert {d.name for d in app_spec.deployments} == names == {"Router", "Tokenizer", "LLMServer"}
    llm = next(d for d in app_spec.deployments if d.name == "LLMServer")
    assert llm.autoscaling_config["min_replicas"] >= 1
    assert llm.ray_actor_options.num_gpus == 0
