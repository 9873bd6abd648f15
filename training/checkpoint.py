"""Training checkpoints in safetensors only: adapter weights, optimizer state, and a JSON trainer state.

Never pickle: optimizer moments are flattened to ``state.<param>.<key>`` tensors,
scalars go to trainer_state.json.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from llmaas.app.storage import Storage

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"


@dataclass
class TrainerState:
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    tokens_seen: int = 0
    final: bool = False


def save_checkpoint(directory: Path, peft_model, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS))
    peft_cfg = peft_model.peft_config["default"].to_dict()
    peft_cfg["target_modules"] = sorted(peft_cfg["target_modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2, default=str))
    opt = optimizer.state_dict()
    tensors = {f"state.{idx}.{key}": (val if torch.is_tensor(val) else torch.tensor(val)).detach().cpu().contiguous()
               for idx, s in opt["state"].items() for key, val in s.items()}
    save_file(tensors or {"_empty": torch.zeros(1)}, str(directory / OPTIMIZER))
    (directory / STATE).write_text(json.dumps({**asdict(state), "param_groups": opt["param_groups"]}))


def load_checkpoint(directory: Path, peft_model, optimizer: torch.optim.Optimizer) -> TrainerState:
    set_peft_model_state_dict(peft_model, load_file(str(directory / ADAPTER_WEIGHTS)))
    raw = json.loads((directory / STATE).read_text())
    groups = raw.pop("param_groups")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in load_file(str(directory / OPTIMIZER)).items():
        if key == "_empty":
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return TrainerState(**raw)


def publish_adapter(src: Path, storage: Storage, key: str, extra_files: dict[str, str]) -> None:
    """Uploads the adapter files of checkpoint ``src`` plus ``extra_files`` under ``key``. Whoever names the
    result (the job record, then the registry) does so after this returns: nothing half-uploaded is named."""
    with tempfile.TemporaryDirectory(prefix="llmaas-adapter-") as tmp:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copyfile(src / name, Path(tmp) / name)
        for name, text in extra_files.items():
            (Path(tmp) / name).write_text(text)
        storage.upload_dir(Path(tmp), key)
