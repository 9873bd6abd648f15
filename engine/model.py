"""Our forward pass for the Llama family over the paged KV cache.

Weights and the per-module math (RMSNorm, linear projections, SwiGLU MLP, rotary
frequencies with the config's RoPE scaling) are the loaded transformers model's own
modules; we own the layer loop, RoPE application on flat token rows, the KV cache
writes and attention, so tokens of many sequences run in one flat batch
(``[num_tokens, hidden]``) instead of a padded ``[B, S, hidden]``.

References: Llama (Touvron et al., 2023), RoFormer (Su et al., 2021), vLLM's
PagedAttention (Kwon et al., 2023), nano-vllm's flat-token model runner.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionMetadata, KVCache, build_metadata, paged_attention
from .config import triton_block_size_ok
from .lora import ATTN_MODULES, GROUPS, MLP_MODULES, LoRABatch, LoRAPool
from .quantization import FUSED, has_triton

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalLM(nn.Module):
    """Flat-token forward over a transformers Llama-family model's modules."""

    decode_graphs = False  # whether decode steps can be captured in CUDA graphs (the Triton path: cuda_graphs.py)

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
        h = self.hf_model.model.embed_tokens(input_ids)  # [T, hidden]
        cos = self.cos[positions][:, None, :]  # [T, 1, D]
        sin = self.sin[positions][:, None, :]  # [T, 1, D]
        t = input_ids.shape[0]
        use_lora = lora is not None and pool is not None and bool(lora.segments)

        def proj(module: nn.Linear, x: torch.Tensor, layer: int, name: str) -> torch.Tensor:
            y = module(x)
            return pool.apply(y, x, layer, name, lora) if use_lora else y

        def group(x: torch.Tensor, layer: int, modules: tuple[nn.Linear, ...], names: tuple[str, ...],
                  fused: nn.Module | None) -> list[torch.Tensor]:
            if fused is not None:  # one call for the group; column views of its output, LoRA adds into them
                ys = list(fused(x).split([m.out_features for m in modules], dim=-1))
            else:
                ys = [m(x) for m in modules]
            if use_lora:
                pool.apply_group(ys, x, layer, names, lora)
            return ys

        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            q, k, v = group(x, i, (attn.q_proj, attn.k_proj, attn.v_proj), QKV, getattr(attn, FUSED[QKV], None))
            q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, kv_heads, D]
            v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, kv_heads, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv_cache.write(i, meta.slot_mapping, k, v)
            o = paged_attention(q, kv_cache.k[i], kv_cache.v[i], meta, self.scale)  # [T, H * D]
            h = h + proj(attn.o_proj, o, i, "o_proj")
            x = layer.post_attention_layernorm(h)
            gate, up = group(x, i, (mlp.gate_proj, mlp.up_proj), GATE_UP, getattr(mlp, FUSED[GATE_UP], None))
            gated = mlp.act_fn(gate) * up
            h = h + proj(mlp.down_proj, gated, i, "down_proj")
        return self.hf_model.model.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32."""
        return self.hf_model.lm_head(hidden).float()


def resolve_backend(backend: str, device: torch.device | str, block_size: int) -> str:
    """``auto`` -> ``triton`` on a CUDA device where triton is installed and the block size suits its kernels,
    else ``torch`` (``backend`` is one of ``config.ATTENTION_BACKENDS``, validated by ``EngineConfig``)."""
    if backend == "auto":
        cuda = torch.device(device).type == "cuda"
        usable = cuda and triton_block_size_ok(block_size) and has_triton()
        return "triton" if usable else "torch"
    return backend


def build_model(hf_model: nn.Module, max_model_len: int, backend: str, block_size: int) -> CausalLM:
    """The forward the engine runs: the CPU path (transformers modules, gathered attention) or the CUDA path
    (fused weights, Triton kernels). The one place the two are chosen."""
    if resolve_backend(backend, next(hf_model.parameters()).device, block_size) == "triton":
        from .triton_model import TritonCausalLM  # triton is an optional dependency (CUDA builds, test extras)

        return TritonCausalLM(hf_model, max_model_len, block_size)
    return CausalLM(hf_model, max_model_len)
