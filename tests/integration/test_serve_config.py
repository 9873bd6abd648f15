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


def test_serve_settings_are_the_same_in_code_and_config(ray_cluster):
    """SERVE_ENV_VARS reach every replica whichever way the app is started: build_app() (Python, tests) and the
    deploy config (whose ray_actor_options replace the code's). build_app() applies them once Ray is up."""
    from llmaas.deployments.builder import build_app
    from llmaas.deployments.config import SERVE_ENV_VARS

    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert raw["applications"][0]["runtime_env"]["env_vars"] == SERVE_ENV_VARS
    router = build_app({})._bound_deployment
    deployments = [router, *(a._bound_deployment for a in router.init_args if hasattr(a, "_bound_deployment"))]
    for d in deployments:
        assert d.ray_actor_options["runtime_env"]["env_vars"] == SERVE_ENV_VARS, d.name
        assert d.ray_actor_options["num_cpus"] > 0, d.name  # the decorator's options kept


def test_replicas_run_with_the_serve_settings(serve_app):
    """The running replicas of each stage have them in their environment, where Serve reads them at start (the
    tests' Ray, like a user's cluster, starts without them: only the replicas' runtime_env brings them)."""
    import ray

    from llmaas.deployments.config import SERVE_ENV_VARS
    from tests.integration.conftest import APP

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#" in a["name"]]
    for role in ("LLMServer", "Router", "Tokenizer"):
        replica = next(a for a in actors if f"#{role}#" in a["name"])
        env = ray.get(ray.get_actor(replica["name"], namespace=replica["namespace"]).__ray_call__.remote(
            lambda self, keys=tuple(SERVE_ENV_VARS): {k: __import__("os").environ.get(k) for k in keys}))
        assert env == SERVE_ENV_VARS, role


def test_the_proxy_reaches_replicas_over_grpc_as_make_serve_starts_it(ray_cluster):
    """`make serve` starts its Ray with PROXY_ENV_VARS; the tests' Ray (and the e2e `serve run`) the same way, so
    the proxy the tests talk to forwards requests as a user's does."""
    import ray

    from llmaas.deployments.config import PROXY_ENV_VARS

    serve_line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "serve run" in line)
    assert all(f"{k}={v}" in serve_line for k, v in PROXY_ENV_VARS.items()), serve_line
    proxies = [a for a in ray.util.list_named_actors(all_namespaces=True) if "PROXY_ACTOR" in a["name"]]
    assert proxies
    for p in proxies:
        env = ray.get(ray.get_actor(p["name"], namespace=p["namespace"]).__ray_call__.remote(
            lambda self, keys=tuple(PROXY_ENV_VARS): {k: __import__("os").environ.get(k) for k in keys}))
        assert env == PROXY_ENV_VARS, p["name"]
