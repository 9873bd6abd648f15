"""build_app(): wires the serving graph. serve_config.yaml's import_path points here."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.serve import Application, Deployment

from llmaas.deployments.config import SERVE_ENV_VARS, AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Router(ingress) -> Tokenizer, LLMServer. ``args`` are AppConfig fields (serve_config.yaml ``args``)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    return wire(config, with_serve_env)


def wire(config: AppConfig, dress: Callable[[Deployment], Deployment]) -> Application:
    """The serving graph, each deployment passed through ``dress`` (its replicas' options) first."""
    return dress(Router).bind(dress(Tokenizer).bind(config), dress(LLMServer).bind(config), config)


def with_serve_env(deployment: Deployment) -> Deployment:
    """The deployment with SERVE_ENV_VARS in its replicas' environment, on top of the driver's runtime_env (which
    Serve copies into a deployment only where it has none of its own). A deploy config's ``ray_actor_options``
    replace these; serve_config.yaml sets them for the whole application instead.

    Before Ray is up the driver's runtime_env is unknown: the deployment is left as it is (Serve's threading, and
    Serve copies the driver's runtime_env at ``serve.run``), rather than replicas losing a job's pip or env_vars.
    """
    if not ray.is_initialized():
        return deployment
    options = dict(deployment.ray_actor_options or {})
    job_env = dict(ray.get_runtime_context().runtime_env or {})
    own = options.get("runtime_env") or {}
    env_vars = {**(job_env.get("env_vars") or {}), **SERVE_ENV_VARS, **(own.get("env_vars") or {})}
    return deployment.options(ray_actor_options={**options, "runtime_env": {**job_env, **own, "env_vars": env_vars}})
