"""Tiny random Llama models built in process (for speed), and the default model's tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmaas.engine import LORA_TARGET_MODULES


def tiny_llama_config(vocab_size: int = 256, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2,  # peaked logits: greedy parity never hinges on a near-tie
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def save_tiny_chat_model(target: Path, tokenizer_dir: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template, saved as a checkpoint."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama(seed, vocab_size=len(tok), eos_token_id=tok.eos_token_id, max_position_embeddings=max_positions,
                       tie_word_embeddings=True, initializer_range=0.05)
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    for extra in ("generation_config.json",):
        src = Path(tokenizer_dir) / extra
        if src.exists():
            shutil.copy(src, target / extra)
    return target


ALL_LORA_MODULES = list(LORA_TARGET_MODULES)


def make_peft_adapter(base, path, seed: int, r: int = 8, targets=ALL_LORA_MODULES, b_std: float = 0.3,
                      **extra) -> str:
    """A random PEFT LoRA adapter (safetensors) whose delta visibly changes greedy output."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # init_lora_weights=False leaves B small: make the delta matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    peft_model.save_pretrained(str(path))
    return str(path)
