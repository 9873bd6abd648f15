"""build_app(): wires the serving graph. serve_config.yaml's import_path points here."""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Router(ingress) -> Tokenizer, LLMServer. ``args`` are AppConfig fields (serve_config.yaml ``args``)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    return Router.bind(Tokenizer.bind(config), LLMServer.bind(config), config)
