"""Our forward pass for the Llama family over the paged KV cache.

Weights and the per-module math (RMSNorm, linear projections, SwiGLU MLP, rotary frequencies with the config's RoPE
scaling) are the loaded transformers model's own; we own the layer loop, with q/k/v and gate/up each fused into one
GEMM, the residual stream in float32 whatever the compute dtype (and the LM head's top logits recomputed in
float32: ``compute_logits``), RMSNorm as torch's one op in float32, RoPE on q and k together in three ops, the KV
cache writes and attention, so tokens of many sequences run in one flat batch (``[num_tokens, hidden]``) instead of
a padded ``[B, S, hidden]``. On a small model a CPU decode step is mostly per-op overhead, not bytes: 43 ops per
layer became 34 in bf16, now 24 (``benchmarks/op_count.py``; two of them keep non-finite values out of the cache),
and the default model's int4 single stream went from 0.72x to 0.78x llama.cpp's on the same GGUF
(``benchmarks/single_stream.py``, fp32, 2-core Intel Xeon, one run each).

References: Llama (Touvron et al., 2023), RoFormer (Su et al., 2021), vLLM's
PagedAttention (Kwon et al., 2023), nano-vllm's flat-token model runner.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, KVCache, build_metadata, paged_attention
from .config import triton_block_size_ok
from .lora import ATTN_MODULES, GROUPS, MLP_MODULES, LoRABatch, LoRAPool
from .quantization import FUSED, QuantizedLinear, dequantize_int8, has_triton

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
QKV, GATE_UP = GROUPS


class UnsupportedModelError(ValueError):
    pass


def check_supported(hf_model: nn.Module) -> None:
    arch = type(hf_model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    rope = getattr(hf_model.config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic":
        raise UnsupportedModelError("dynamic RoPE scaling is not supported (its frequencies depend on the batch)")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (transformers' rotate-half RoPE) in three ops: rotate_half(x) is x with
    its halves swapped and the first one negated, and the sign is folded into ``sin_signed``.

    Args:
        x: Shape: [T, N, D] (q and k heads side by side: one call for both).
        cos, sin_signed: Shape: [T, 1, D].
    """
    t, n, d = x.shape
    swapped = x.reshape(t, n, 2, d // 2).flip(2).view(t, n, d)
    return torch.addcmul(x * cos, swapped, sin_signed)


def _rms_norm(norm: tuple[torch.Tensor, float], h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' Llama-family RMSNorm of the float32 residual stream as torch's one op (the same math, ~1.5x
    faster on CPU than the module's eight), rounded once to the compute dtype.

    Args:
        norm: the module's weight in float32 and its epsilon. h: Shape: [T, hidden], float32.
    """
    out = F.rms_norm(h, norm[0].shape, norm[0], norm[1])
    return out if out.dtype == dtype else out.to(dtype)


def fused_projection(owner: nn.Module, parts: tuple[nn.Module, ...], group: tuple[str, ...]) -> nn.Module:
    """One module computing the group's projections side by side: a quantized fused module when quantization
    made one, else an ``nn.Linear`` over the concatenated weights, whose parts become views of it (no second
    copy of the weights). Parts that are neither (quantized in different formats) run one by one."""
    existing = getattr(owner, FUSED[group], None)
    if existing is not None:
        return existing
    if not all(isinstance(p, nn.Linear) for p in parts):
        return _Concat(parts)
    weight = torch.cat([p.weight for p in parts])  # [sum(out), in]
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")  # parameters set below
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    row = 0
    for p in parts:
        rows = p.weight.shape[0]
        p.weight = nn.Parameter(weight[row:row + rows], requires_grad=False)
        if has_bias:
            p.bias = nn.Parameter(fused.bias[row:row + rows], requires_grad=False)
        row += rows
    return fused


class _Concat(nn.Module):
    """The parts' outputs side by side, as a fused module gives them: [T, sum(out)]."""

    def __init__(self, parts: tuple[nn.Module, ...]) -> None:
        super().__init__()
        self.parts = list(parts)  # not registered: they belong to the model already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class CausalLM(nn.Module):
    """Flat-token forward over a transformers Llama-family model's modules, q/k/v and gate/up fused."""

    decode_graphs = False  # whether decode steps can be captured in CUDA graphs (the Triton path: cuda_graphs.py)
    head_major_cache = True  # the KV cache layout this forward reads (attention.py: whole-block gathers)

    def __init__(self, hf_model: nn.Module, max_model_len: int) -> None:
        super().__init__()
        check_supported(hf_model)
        cfg = hf_model.config
        self.hf_model = hf_model.eval()
        self.config = cfg
        self.layers = hf_model.model.layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.layers[0].self_attn.scaling
        param = next(hf_model.parameters())
        # Tables in float32, rounded once to the model's dtype. Casting the model to bf16 also rounds the rotary
        # module's inv_freq buffer, and position x a rounded frequency drifts (SmolLM2: cos off by 1.1 at
        # position 1000); a fresh module recomputes inv_freq from the config in float32, with the config's scaling.
        rotary = type(hf_model.model.rotary_emb)(cfg).to(param.device)
        positions = torch.arange(max_model_len, device=param.device)[None]  # [1, max_len]
        with torch.no_grad():
            cos, sin = rotary(torch.empty(0, device=param.device), positions)  # [1, max_len, D] each, float32
        self.register_buffer("cos", cos[0].to(param.dtype), persistent=False)  # [max_len, D]
        self.register_buffer("sin", sin[0].to(param.dtype), persistent=False)  # [max_len, D]
        half = self.head_dim // 2
        self.register_buffer("sin_signed", torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1),
                             persistent=False)  # [max_len, D]: rotate_half's sign folded in (_rope)
        # One GEMM per group instead of three and two: on a 135M model the calls, not the bytes, are most of a
        # decode step (the parts stay usable, as views of the fused weight)
        self.qkv = [fused_projection(layer.self_attn, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj), QKV) for layer in self.layers]
        self.gate_up = [fused_projection(layer.mlp, (layer.mlp.gate_proj, layer.mlp.up_proj), GATE_UP)
                        for layer in self.layers]
        # The residual stream stays in float32 whatever the compute dtype (the norms read it in float32 anyway):
        # SmolLM2's hidden states reach |x| ~ 14000, where bf16's step is 64, and a bf16 stream made greedy
        # answers hinge on rounding (the default model answered "What is the capital of France?" with "L'Etoile,
        # la Marseillaise..." in bf16: its top two logits 0.04 apart, then one bf16 step of the LM head's output).
        def norm(module: nn.Module) -> tuple[torch.Tensor, float]:
            return module.weight.detach().float(), module.variance_epsilon
        # Copies frozen here: the engine moves, quantizes and casts the model before building this, and nothing
        # (adapters target projections only) changes a norm's weight afterwards.
        self.norms = [(norm(layer.input_layernorm), norm(layer.post_attention_layernorm)) for layer in self.layers]
        self.final_norm = norm(hf_model.model.norm)
        self.dtype = param.dtype
        self.q_width = self.num_heads * self.head_dim
        self.kv_width = self.num_kv_heads * self.head_dim
        self.widths = {QKV: [self.q_width, self.kv_width, self.kv_width],
                       GATE_UP: [cfg.intermediate_size, cfg.intermediate_size]}

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        layer = self.layers[0]
        mods = {n: getattr(layer.self_attn, n) for n in ATTN_MODULES} | {n: getattr(layer.mlp, n) for n in MLP_MODULES}
        return {n: (m.in_features, m.out_features) for n, m in mods.items()}

    def build_metadata(self, starts: list[int], num_new: list[int], block_tables: list[list[int]], block_size: int,
                       device: torch.device | str) -> AttentionMetadata:
        """The step's attention metadata (see ``attention.build_metadata``)."""
        return build_metadata(starts, num_new, block_tables, block_size, device)

    def prepare_lora(self, batch: LoRABatch, pool: LoRAPool | None, num_tokens: int,
                     device: torch.device | str) -> LoRABatch:
        """The step's adapter layout, as ``forward`` takes it."""
        if pool is not None:
            pool.prepare(batch, device)
        return batch

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache, lora: LoRABatch | None = None, pool: LoRAPool | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns final hidden states [num_tokens, hidden]."""
        h = self.hf_model.model.embed_tokens(input_ids).float()  # [T, hidden]: the residual stream, float32
        dtype = self.dtype
        cos = self.cos[positions][:, None, :]  # [T, 1, D]
        sin = self.sin_signed[positions][:, None, :]  # [T, 1, D]
        t, heads, b = input_ids.shape[0], self.num_heads, meta.block_tables.shape[0]
        rows = kv_cache.block_rows(meta.block_tables, meta.block_size)  # [kv * B * blocks], every layer's gather
        use_lora = lora is not None and pool is not None and bool(lora.segments)

        def group(x: torch.Tensor, layer: int, fused: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
            y = fused(x)  # [T, sum(out)]
            if use_lora:  # LoRA adds into column views of the fused output
                pool.apply_group(list(y.split(self.widths[names], dim=-1)), x, layer, names, lora)
            return y

        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = _rms_norm(self.norms[i][0], h, dtype)
            qkv = group(x, i, self.qkv[i], QKV)  # [T, q + 2 kv]
            qk = _rope(qkv[:, :self.q_width + self.kv_width].view(t, heads + self.num_kv_heads, self.head_dim),
                       cos, sin)  # [T, H + kv_heads, D]
            v = qkv[:, self.q_width + self.kv_width:].view(t, self.num_kv_heads, self.head_dim)
            kv_cache.write(i, meta.slot_mapping, qk[:, heads:], v)
            k_seq, v_seq = kv_cache.gather(i, rows, b, meta.block_size)  # [kv_heads, B, K, D] each
            o = paged_attention(qk[:, :heads], k_seq, v_seq, meta, self.scale)  # [T, H * D]
            y = attn.o_proj(o)
            h = h + (pool.apply(y, o, i, "o_proj", lora) if use_lora else y)
            x = _rms_norm(self.norms[i][1], h, dtype)
            gate, up = group(x, i, self.gate_up[i], GATE_UP).split(self.widths[GATE_UP], dim=-1)
            gated = mlp.act_fn(gate).mul_(up)
            y = mlp.down_proj(gated)
            h = h + (pool.apply(y, gated, i, "down_proj", lora) if use_lora else y)
        return _rms_norm(self.final_norm, h, torch.float32)  # the LM head rounds it (compute_logits)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (float32 on the CPU path; the Triton path's forward gives bf16) -> logits [N, vocab]
        in float32.

        In a lower compute dtype the head's GEMM rounds its outputs too: bf16 logits near 25 come in steps of
        0.125, so close candidates tie and greedy picks by token id. The REFINE_TOP largest of each row are
        recomputed in float32 (their weight rows, the float32 hidden state): the choice among them and their
        probabilities are exact; the long tail keeps the GEMM's rounding."""
        head = self.hf_model.lm_head
        logits = head(hidden.to(self.dtype)).float()
        if self.dtype == torch.float32:
            return logits
        top = logits.topk(min(REFINE_TOP, logits.shape[-1]), dim=-1).indices  # [N, k]
        rows = _head_rows(head, top)  # [N, k, hidden] float32
        if rows is not None:
            logits.scatter_(1, top, torch.einsum("nkh,nh->nk", rows, hidden.float()))
        return logits


REFINE_TOP = 8  # logits per row recomputed in float32 when the compute dtype is lower (CausalLM.compute_logits)


def _head_rows(head: nn.Module, index: torch.Tensor) -> torch.Tensor | None:
    """The LM head's weight rows ``index`` (any shape) in float32: a dense head, or an int8 one (per-row scales,
    the head of every quantization mode); None for another kind."""
    if getattr(head, "bias", None) is not None:  # rows alone would drop it: leave such a head's logits as they are
        return None
    if isinstance(head, nn.Linear):
        return head.weight[index].float()
    if isinstance(head, QuantizedLinear) and head.mode == "int8":  # the scales as the GEMM reads them
        flat = index.reshape(-1)
        return dequantize_int8(head.qweight[flat], head.scales[flat], torch.float32).view(*index.shape, -1)
    return None


def resolve_backend(backend: str, device: torch.device | str, block_size: int) -> str:
    """``auto`` -> ``triton`` on a CUDA device where triton is installed and the block size suits its kernels,
    else ``torch`` (``backend`` is one of ``config.ATTENTION_BACKENDS``, validated by ``EngineConfig``)."""
    if backend == "auto":
        cuda = torch.device(device).type == "cuda"
        usable = cuda and triton_block_size_ok(block_size) and has_triton()
        return "triton" if usable else "torch"
    return backend


def build_model(hf_model: nn.Module, max_model_len: int, backend: str, block_size: int) -> CausalLM:
    """The forward the engine runs: the CPU path (torch ops, gathered attention) or the CUDA path
    (fused weights, Triton kernels). The one place the two are chosen."""
    if resolve_backend(backend, next(hf_model.parameters()).device, block_size) == "triton":
        from .triton_model import TritonCausalLM  # triton is an optional dependency (CUDA builds, test extras)

        return TritonCausalLM(hf_model, max_model_len, block_size)
    return CausalLM(hf_model, max_model_len)
