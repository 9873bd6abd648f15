"""A GGUF file's 4-bit blocks as our int4 layout: the codes as they are, no float round trip.

llama.cpp's Q4_0 and Q4_1 (ggml-quants.c) store 32 weights per block: an fp16 scale ``d`` (and, Q4_1, an
fp16 minimum ``m``), then 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31:

    Q4_0: w = (q - 8) * d        Q4_1: w = q * d + m

Both are QuantizedLinear's int4 (``(q - 8) * s + z``, group 32) with ``s = d`` and ``z = 0`` or ``m + 8 d``
(exact in float32; rounded to bf16 when that is the compute dtype, as every scale is). llama.cpp's converter
permutes the rows of q_proj / k_proj (rotary halves interleaved); we undo it the way transformers' GGUF
loader does. Other tensors (Q8_0 embeddings, norms) come from the float checkpoint.
Needs the ``gguf`` package (imported on use: the engine runs without it).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .quantization import QuantizedLinear, int4_block_for, pack_int4, pack_scales_zeros

BLOCK = 32
PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def q4_blocks(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw: [N, K/32 * bytes per block] uint8 rows of Q4_0 or Q4_1 blocks -> (q [N, K] int32 in [0, 15],
    scales [N, K/32], zeros [N, K/32]) as float32."""
    head = {"Q4_0": 2, "Q4_1": 4}[kind]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, head + BLOCK // 2)  # [N, K/32, bytes]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    zeros = (blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
             if kind == "Q4_1" else np.zeros_like(d))
    qs = blocks[..., head:]  # [N, K/32, 16]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, -1)  # [N, K]
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(zeros)


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row index r of the transformers weight -> its row in the GGUF tensor (inverse of llama.cpp's permute)."""
    return torch.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(n_rows)


def load_int4_projections(path: str, hf_model: nn.Module, dtype: torch.dtype) -> dict[str, QuantizedLinear]:
    """Module path (``model.layers.3.mlp.up_proj``) -> QuantizedLinear for every Q4_0 / Q4_1 projection in the
    GGUF file at ``path`` whose shape matches ``hf_model``'s; other tensors are left to the float weights. Only
    llama-architecture files (whose q/k rows llama.cpp permutes the way we undo); others give {}."""
    from gguf import GGUFReader  # optional: only the GGUF path needs it

    reader = GGUFReader(path)
    field = reader.fields.get("general.architecture")
    if field is None or bytes(field.parts[field.data[0]]).decode() != "llama":
        return {}
    cfg = hf_model.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    device = next(hf_model.parameters()).device  # the layout is the one its kernels read there
    out: dict[str, QuantizedLinear] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")  # blk.{i}.{kind}.weight
        kind = tensor.tensor_type.name
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PROJECTIONS or kind not in ("Q4_0", "Q4_1"):
            continue
        module_path = f"model.layers.{parts[1]}.{PROJECTIONS[parts[2]]}"
        linear = hf_model.get_submodule(module_path)
        q, scales, zeros = q4_blocks(tensor.data, kind)
        if tuple(q.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{path}: {tensor.name} is {tuple(q.shape)}, the model's {module_path} is "
                             f"{(linear.out_features, linear.in_features)}: not this model's GGUF")
        if parts[2] in heads:
            rows = unpermute_rows(q.shape[0], heads[parts[2]])
            q, scales, zeros = q[rows], scales[rows], zeros[rows]
        block = int4_block_for(q, device)
        out[module_path] = QuantizedLinear("int4", linear.in_features, linear.out_features, pack_int4(q, block),
                                           pack_scales_zeros(scales, zeros), dtype, block)
    return out
