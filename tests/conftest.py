"""Shared fixtures: the default model's cached checkpoint (converted once per machine)."""
from __future__ import annotations

import os
import sys
import uuid
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
    """A tiny random Llama checkpoint with the default model's tokenizer and chat template; 1024 positions hold
    SmolLM2's tool-calling prompt (~400 tokens for two tools)."""
    from tests.models import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tinychat") / "tiny-chat", default_model_dir,
                                max_positions=1024)


@pytest.fixture(scope="session")
def tiny_long_chat_dir(tmp_path_factory, default_model_dir) -> Path:
    """The tiny chat model with a 2048-token context: streams long enough to outlast a deadline or a redeploy."""
    from tests.models import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tinylong") / "tiny-long", default_model_dir,
                                max_positions=2048)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto, in a subprocess) for the session; the AWS_* env points at it meanwhile."""
    from tests.s3server import s3_env, start_moto_server

    endpoint, stop = start_moto_server()
    env = s3_env(endpoint)
    saved = {name: os.environ.get(name) for name in [*env, "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE"]}
    for name in saved:  # a developer's own AWS settings must not redirect the tests
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop()


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server, as the storage root ``s3://<bucket>/llmaas``."""
    from tests.s3server import make_bucket

    bucket = f"llmaas-test-{uuid.uuid4().hex[:16]}"
    make_bucket(s3_server, bucket)
    return f"s3://{bucket}/llmaas"


@pytest.fixture
def open_via_dying_server(s3_root, monkeypatch):
    """Opens ``s3_root`` through a proxy that dies after a given number of request bytes."""
    stops = []

    from llmaas.app.storage import open_storage
    from tests.s3server import start_dying_proxy

    def open_via(die_after_bytes: int):
        url, died, stop = start_dying_proxy(os.environ["AWS_ENDPOINT_URL"], die_after_bytes)
        stops.append(stop)
        with monkeypatch.context() as m:
            m.setenv("AWS_ENDPOINT_URL", url)
            return open_storage(s3_root), died

    yield open_via
    for stop in stops:
        stop()
