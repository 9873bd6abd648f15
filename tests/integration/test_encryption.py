"""Encryption at rest on the real Serve app: upload, fine-tune on Ray Train, serve the adapter, all on a root
marked encrypted; then every stored byte is read and no training line, JSON record or safetensors header is
found; the README's lines run as written; a wrong key fails clearly; rotation rewrites no data."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from ray import serve

from llmaas.app.storage import EncryptionKeyError, encrypted, open_storage
from llmaas.app.storage.encrypted import MAGIC, MASTER_KEY_FILE_ENV
from llmaas.deployments.cli import main as cli
from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer
from tests.integration.test_finetuning_api import EXAMPLES, EXT, REVIEW, wait_for

KEY = "sk-sealed-acme-0123456789abcdef0123"
from tests.integration.conftest import release_root_actors


@pytest.fixture(scope="module")
def sealed(ray_cluster, app_args, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sealed-storage"))
    cfg = AppConfig.model_validate({**app_args, "storage_root": root, "encrypt_at_rest": True,
                                    "auth": {"api_keys": [{"key": KEY, "tenant": "acme"}]}})
    serve.run(Router.bind(Tokenizer.bind(cfg), LLMServer.options(ray_actor_options={"num_cpus": 0.5}).bind(cfg),
                          cfg), name="sealed-app", route_prefix="/sealed")
    yield root, openai.OpenAI(base_url=f"{ray_cluster}/sealed/v1", api_key=KEY, max_retries=0)
    serve.delete("sealed-app")
    release_root_actors(root)


def raw_objects(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_the_whole_loop_on_an_encrypted_root_leaves_no_plaintext(sealed):
    root, client = sealed
    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()[:64]
    upload = client.files.create(file=("train.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())),
                                 purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=upload.id, suffix="sealed",
                                         hyperparameters={"n_epochs": 1, "batch_size": 8,
                                                          "learning_rate_multiplier": 50},
                                         extra_body={"llmaas": EXT})
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert {"checkpoint", "registered"} <= {e.type for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data}
    answer = client.chat.completions.create(model=done.fine_tuned_model, messages=REVIEW, max_tokens=4,
                                            temperature=0)
    assert answer.model == "sealed@1" and answer.usage.completion_tokens > 0

    raw = raw_objects(root)
    checkpoints = [k for k in raw if k.startswith("ray_runs/") and k.endswith("adapter_model.safetensors")]
    adapters = [k for k in raw if k.startswith("adapters/sealed/") and k.endswith("adapter_model.safetensors")]
    assert checkpoints and adapters and any(k.startswith("files/") for k in raw)  # all of it went to the root
    fragments = [ln[10:50].encode() for ln in lines] + [b'"peft_type"', b"lora_A", b'"dtype"', b'"status"',
                                                        b'"owner"', b'"adapters"', upload.id.encode() + b'"']
    for key, data in raw.items():
        if key.startswith("encryption/"):  # the marker and the wrapped data keys
            continue
        assert data.startswith(MAGIC), key
        assert not any(f in data for f in fragments), key  # no training line, JSON record, safetensors header
    tenants = {data[len(MAGIC) + 2:len(MAGIC) + 2 + data[len(MAGIC) + 1]] for k, data in raw.items()
               if k.startswith(("files/", "adapters/sealed/", "ray_runs/")) and k.endswith((".jsonl", ".safetensors"))}
    assert tenants == {b"acme"}  # acme's data under acme's own data key
    assert open_storage(root).read(f"files/{upload.id}.jsonl").decode().splitlines() == lines


def test_readme_lines_wrong_key_and_rotation(sealed, master_key_file, tmp_path, monkeypatch, capsys):
    root, client = sealed
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop(MASTER_KEY_FILE_ENV)

    def bash(lines: list[str]) -> str:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first, rotation = readme_encryption_blocks()
    assert bash(first).strip().endswith(": not encrypted")  # the first time: a key, and a root not made yet
    key = home / ".llmaas-master.key"
    assert oct(key.stat().st_mode)[-3:] == "600" and len(base64.b64decode(key.read_text())) == 32

    key.write_text(master_key_file.read_text())  # the key this app's processes were started with
    before = {k: v for k, v in raw_objects(root).items() if not k.startswith("encryption/")}
    out = bash([line.replace("~/.cache/llmaas/sealed", root) for line in rotation])
    assert "data keys re-wrapped" in out and not out.startswith("0 ")
    assert {k: v for k, v in raw_objects(root).items() if not k.startswith("encryption/")} == before  # no data

    new_key = home / ".llmaas-master-2.key"
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(new_key))  # the rollout's end: the new key alone
    assert cli(["encryption", "status", "--storage-root", root]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["wrapped_by"] == status["this_process_keys"] and status["data_keys"] >= 2  # acme + system
    upload = next(k for k in before if k.startswith("files/") and k.endswith(".jsonl"))
    assert json.loads(open_storage(root).read(upload).splitlines()[0])  # a new process with the new key reads
    monkeypatch.setenv(MASTER_KEY_FILE_ENV, str(master_key_file))
    encrypted._keyrings.clear()  # as a new process would be: nothing unwrapped yet
    with pytest.raises(EncryptionKeyError, match="wrapped by master key .* this process has master key"):
        open_storage(root).read(upload)  # the old key no longer opens the root
    # the running app keeps serving: its processes hold the data keys they unwrapped before the rotation
    assert client.chat.completions.create(model="sealed", messages=REVIEW, max_tokens=2).choices


def readme_encryption_blocks() -> tuple[list[str], list[str]]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("**Encryption at rest.**", 1)[1]
    blocks = [b.split("```", 1)[0].strip().splitlines() for b in text.split("```bash\n")[1:3]]
    assert [ln.split()[:3] for ln in blocks[0]] == [["(umask", "077;", "llmaas"],
                                                   ["export", "LLMAAS_MASTER_KEY_FILE=~/.llmaas-master.key", "#"],
                                                   ["llmaas", "encryption", "status"]]
    assert [ln.split()[:2] for ln in blocks[1]] == [["(umask", "077;"], ["export", "LLMAAS_MASTER_KEY_FILE="
                                                                         "~/.llmaas-master-2.key"],
                                                    ["llmaas", "encryption"]]
    return blocks[0], blocks[1]
