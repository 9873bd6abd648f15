"""Multi-LoRA: PEFT adapters loaded into a fixed pool of slots, mixed in one batch.

LoRA (Hu et al., 2021): ``h = W0 x + (alpha / r) B A x``. Serving many adapters at once
follows S-LoRA (Sheng et al., 2023) and Punica (Chen et al., 2023): the batch is
ordered by adapter so each adapter owns a contiguous segment of token rows, and the
delta is a segmented matmul

    y[s[i]:s[i+1]] += (x[s[i]:s[i+1]] @ A[slot[i]].T @ B[slot[i]].T) * scale[slot[i]]

Rows without an adapter are simply not in any segment. Adapter weights live in
preallocated ``[num_slots, max_rank, ...]`` buffers (rank-padded with zeros, which adds
nothing); ``SlotTable`` keeps the books (resident adapters, pins, LRU) without torch.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections of one input
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_MODULES = ATTN_MODULES + MLP_MODULES  # every projection an adapter may target: training uses the same


def projection_shapes(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      intermediate: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable projection of a Llama-style decoder layer."""
    kv = num_kv_heads * head_dim
    return {"q_proj": (hidden, num_heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (num_heads * head_dim, hidden), "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


class AdapterError(ValueError):
    """An adapter that cannot be served here (format, rank, targets, base model)."""


@dataclass(slots=True)
class AdapterWeights:
    name: str
    rank: int
    scale: float  # alpha / r (or alpha / sqrt(r) with rsLoRA)
    # (layer, module) -> (A [r, in], B [out, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def check_fits(adapter: AdapterWeights, projection_shapes: dict[str, tuple[int, int]], path: str | Path) -> None:
    """Raises AdapterError unless every delta maps the base projection's input size to its output size (an adapter
    trained on another base). The one shape check: the engine and the registry both call it."""
    for (_layer, module), (a, b) in adapter.weights.items():
        want_in, want_out = projection_shapes[module]
        if a.shape[1] != want_in or b.shape[0] != want_out:
            raise AdapterError(f"{path}: {module} shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the base "
                               f"model ({want_in} -> {want_out}); was it trained on another base model?")


def load_peft_adapter(path: str | Path | Mapping[str, bytes], name: str, num_layers: int,
                      max_rank: int) -> AdapterWeights:
    """Reads a PEFT LoRA: adapter_config.json + adapter_model.safetensors (never pickle), from a directory or
    from those files' bytes already in memory (``{"adapter_config.json": b"...", ...}``, e.g. decrypted)."""
    if isinstance(path, Mapping):
        files, path = path, name
        if "adapter_config.json" not in files or "adapter_model.safetensors" not in files:
            raise AdapterError(f"{path}: adapter_config.json and adapter_model.safetensors are both needed")
        raw_cfg, raw_weights = files["adapter_config.json"], files["adapter_model.safetensors"]
    else:
        path = Path(path)
        cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not cfg_file.is_file():
            raise AdapterError(f"{path}: adapter_config.json is missing (expected a PEFT LoRA directory)")
        if not weights_file.is_file():
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise AdapterError(f"{path}: only adapter_model.safetensors is loaded; pickle (.bin/.pt) is refused")
            raise AdapterError(f"{path}: adapter_model.safetensors is missing")
        raw_cfg, raw_weights = cfg_file.read_bytes(), weights_file  # a file is memory-mapped, not copied
    cfg = json.loads(raw_cfg)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise AdapterError(f"{path}: {key}={bad} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: LoRA bias and modules_to_save are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    try:
        rank = int(cfg["r"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{path}: adapter_config.json has no integer rank 'r'") from None
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"{path}: rank {rank} is outside this engine's 1..max_lora_rank {max_rank}")
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / (rank ** 0.5) if cfg.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(str(raw_weights)) if isinstance(raw_weights, Path) else load_safetensors(raw_weights)
    except SafetensorError as exc:  # damaged or truncated bytes: the adapter's fault, not the server's
        raise AdapterError(f"{path}: adapter_model.safetensors cannot be read: {exc}") from None
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        parts = key.split(".")
        module = parts[parts.index("lora_A") - 1]
        if module not in LORA_TARGET_MODULES:
            raise AdapterError(f"{path}: target module {module!r} is not supported; "
                               f"use {', '.join(LORA_TARGET_MODULES)}")
        if "layers" not in parts or not parts[parts.index("layers") + 1].isdigit():
            raise AdapterError(f"{path}: {key} names no decoder layer")
        layer = int(parts[parts.index("layers") + 1])
        if layer >= num_layers:
            raise AdapterError(f"{path}: layer {layer} does not exist in the base model ({num_layers} layers)")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise AdapterError(f"{path}: {key} has no matching lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: {key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not have the "
                               f"rank r={rank} its config declares")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{path}: {key} or its lora_B holds NaN or infinite values")
        weights[(layer, module)] = (a, b)
    if not weights:
        raise AdapterError(f"{path}: no LoRA weights found in adapter_model.safetensors")
    return AdapterWeights(name, rank, scale, weights)


class SlotTable:
    """Which adapter sits in which slot; pinned slots (used by running sequences) are never evicted."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._pins: dict[str, int] = {}
        self._free = list(range(num_slots))

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def can_acquire(self, name: str) -> bool:
        return name in self._slot_of or bool(self._free) or any(
            self._pins.get(n, 0) == 0 for n in self._slot_of)

    def acquire(self, name: str) -> tuple[int, bool]:
        """Pins ``name``; returns (slot, whether its weights must be written to the slot)."""
        needs_load = name not in self._slot_of
        if needs_load:
            if not self._free:
                victim = next(n for n in self._slot_of if self._pins.get(n, 0) == 0)
                self._free.append(self._slot_of.pop(victim))
            self._slot_of[name] = self._free.pop()
        self._slot_of.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return self._slot_of[name], needs_load

    def release(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] == 0:
            del self._pins[name]

    def evict(self, name: str) -> bool:
        """Frees ``name``'s slot now if nothing uses it."""
        if name in self._slot_of and not self._pins.get(name):
            self._free.append(self._slot_of.pop(name))
            return True
        return False


@dataclass(slots=True)
class LoRABatch:
    """Per-step adapter segments over the flat token rows (batch ordered by slot).

    ``LoRAPool.prepare`` adds the padded-segment layout (tensors built once per step, used by every
    layer and module) when the segments are even enough for it; otherwise they stay None.
    """

    segments: list[tuple[int, int, int]]  # (row start, row end, slot) for rows that have an adapter
    slots: torch.Tensor | None = None  # [S] slot of each padded batch entry (None: entry i is slot i)
    gather_rows: torch.Tensor | None = None  # [S * L] token row of each padded cell (padding repeats a row)
    cells: torch.Tensor | None = None  # [N] padded cell of each adapter token, in row order
    rows: torch.Tensor | None = None  # [N] token row of each adapter token
    scales: torch.Tensor | None = None  # [S, 1, 1] alpha / r of each entry's adapter
    max_len: int = 0  # L: the longest segment; 0: no padded layout, loop over segments
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, its [S, L, in] gather): q/k/v share one x


class LoRAPool:
    """Preallocated A/B buffers for every slot, layer and target module."""

    def __init__(self, num_slots: int, max_rank: int, num_layers: int, shapes: dict[str, tuple[int, int]],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.max_rank = max_rank
        self.dtype = dtype
        # Projections that read the same x keep their A stacked in one buffer, [L, slots, n * max_rank, in],
        # so one batched matmul computes A x for the whole group; self.a holds per-module views of it.
        self.a_groups: dict[tuple[str, ...], torch.Tensor] = {}
        self.a: dict[str, torch.Tensor] = {}  # module -> [L, slots, max_rank, in]
        for group in GROUPS:
            if all(m in shapes for m in group) and len({shapes[m][0] for m in group}) == 1:
                stacked = torch.zeros(num_layers, num_slots, len(group) * max_rank, shapes[group[0]][0],
                                      dtype=dtype, device=device)
                self.a_groups[group] = stacked
                for i, m in enumerate(group):
                    self.a[m] = stacked[:, :, i * max_rank:(i + 1) * max_rank]
        for m, (i, _) in shapes.items():
            if m not in self.a:
                self.a[m] = torch.zeros(num_layers, num_slots, max_rank, i, dtype=dtype, device=device)
        self.b = {m: torch.zeros(num_layers, num_slots, o, max_rank, dtype=dtype, device=device)
                  for m, (i, o) in shapes.items()}  # module -> [L, slots, out, max_rank]
        self.scale = [0.0] * num_slots

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        for m in self.a:
            self.a[m][:, slot].zero_()
            self.b[m][:, slot].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            r = a.shape[0]
            self.a[module][layer, slot, :r].copy_(a)
            self.b[module][layer, slot, :, :r].copy_(b)
        self.scale[slot] = adapter.scale

    def prepare(self, batch: LoRABatch, device: torch.device | str) -> LoRABatch:
        """Builds the padded layout when padding costs at most 2x the adapter rows (decode steps, even
        prefills); a skewed prefill (one long prompt beside short ones) keeps the per-segment loop.

        When most slots are in use, the padded batch has one entry per slot (entry i = slot i, empty
        ones all padding), so the slot buffers are used in place instead of gathered for every layer.
        """
        lengths = [end - start for start, end, _ in batch.segments]
        if not lengths:
            return batch
        num, width = sum(lengths), max(lengths)
        if len(lengths) == 1 or len(lengths) * width > 2 * num:
            return batch
        num_slots = len(self.scale)
        in_place = num_slots <= 2 * len(lengths)
        entries = list(range(num_slots)) if in_place else [slot for _, _, slot in batch.segments]
        where = {slot: (start, end) for start, end, slot in batch.segments}
        gather, cells, rows = [], [], []
        first = batch.segments[0][0]
        for e, slot in enumerate(entries):
            start, end = where.get(slot, (first, first))
            seg = list(range(start, end))
            gather += seg + [first] * (width - len(seg))
            cells += range(e * width, e * width + len(seg))
            rows += seg
        batch.slots = None if in_place else torch.tensor(entries, device=device)
        batch.gather_rows = torch.tensor(gather, device=device)
        batch.cells = torch.tensor(cells, device=device)
        batch.rows = torch.tensor(rows, device=device)
        batch.scales = torch.tensor([self.scale[slot] for slot in entries], dtype=self.dtype,
                                    device=device).view(-1, 1, 1)
        batch.max_len = width
        return batch

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, batch: LoRABatch) -> torch.Tensor:
        """Adds each segment's LoRA delta to ``y`` in place.

        With the padded layout this is Punica's SGMV as two batched matmuls over [S, L] cells (S segments
        padded to the longest, L), instead of a Python loop of 3 ops per segment: 8 adapters x 7 modules x
        30 layers was ~5000 small ops per decode step.

        Args:
            y: Shape: [num_tokens, out] (base projection output).
            x: Shape: [num_tokens, in] (projection input).
        """
        a_all, b_all = self.a[module][layer], self.b[module][layer]  # [slots, r, in], [slots, out, r]
        if not batch.max_len:
            for start, end, slot in batch.segments:
                y[start:end] += (x[start:end] @ a_all[slot].T) @ b_all[slot].T * self.scale[slot]
            return y
        ax = torch.bmm(self._gathered(x, batch), self._entries(a_all, batch).transpose(1, 2))  # [S, L, r]
        return self._add_delta(y, ax, module, layer, batch)

    def apply_group(self, ys: list[torch.Tensor], x: torch.Tensor, layer: int, modules: tuple[str, ...],
                    batch: LoRABatch) -> None:
        """``apply`` for projections of the same ``x`` (q/k/v, gate/up): one batched matmul computes A x
        for all of them from their stacked A."""
        stacked = self.a_groups.get(modules)
        if stacked is None or not batch.max_len:
            for y, module in zip(ys, modules):
                self.apply(y, x, layer, module, batch)
            return
        ax = torch.bmm(self._gathered(x, batch), self._entries(stacked[layer], batch).transpose(1, 2))  # [S, L, n*r]
        r = self.max_rank
        for i, (y, module) in enumerate(zip(ys, modules)):
            self._add_delta(y, ax[:, :, i * r:(i + 1) * r], module, layer, batch)

    @staticmethod
    def _gathered(x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """x's rows in the padded layout, [S, L, in]; reused while the same x comes back."""
        if batch.gathered is None or batch.gathered[0] is not x:
            batch.gathered = (x, x.index_select(0, batch.gather_rows).view(-1, batch.max_len, x.shape[1]))
        return batch.gathered[1]

    @staticmethod
    def _entries(weights: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """A slot buffer [slots, ...] as the padded batch's entries [S, ...]."""
        return weights if batch.slots is None else weights.index_select(0, batch.slots)

    def _add_delta(self, y: torch.Tensor, ax: torch.Tensor, module: str, layer: int,
                   batch: LoRABatch) -> torch.Tensor:
        """y[rows] += scale * B (A x) for the padded cells that hold real tokens. ax: [S, L, r]."""
        b = self._entries(self.b[module][layer], batch)  # [S, out, r]
        delta = torch.bmm(ax, b.transpose(1, 2)) * batch.scales  # [S, L, out]; PEFT's order: B(A(x)) * scale
        y.index_add_(0, batch.rows, delta.view(-1, delta.shape[-1]).index_select(0, batch.cells))
        return y
