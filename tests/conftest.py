"""Shared fixtures: the default model's cached checkpoint (converted once per machine)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # lets tests import tests.models
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from llmaas.app.model_source import default_model_dir as resolve

    return resolve(Path.home() / ".cache" / "llmaas")


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama checkpoint with the default model's tokenizer and chat template."""
    from tests.models import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tinychat") / "tiny-chat", default_model_dir)


@pytest.fixture(scope="session")
def tiny_long_chat_dir(tmp_path_factory, default_model_dir) -> Path:
    """The tiny chat model with a 2048-token context: streams long enough to outlast a deadline or a redeploy."""
    from tests.models import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tinylong") / "tiny-long", default_model_dir,
                                max_positions=2048)
