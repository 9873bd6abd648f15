"""Offline engine throughput vs peers measured in the same run.

    python -m llmaas.benchmarks.engine_throughput --quick                      # CPU smoke (tiny model)
    python -m llmaas.benchmarks.engine_throughput --model default --requests 32 --prompt-tokens 128 \\
        --gen-tokens 64 --dtype bfloat16                                         # CPU, SmolLM2
    python -m llmaas.benchmarks.engine_throughput --config llama-3.2-1b --requests 256 --prompt-tokens 128 \\
        --gen-tokens 128 --dtype bfloat16 --adapters 8                          # GPU, random weights
    python -m benchmarks.engine_throughput --suite gpu --tag h100              # every GPU target, one process
    python -m llmaas.benchmarks.engine_throughput --suite cpu-smoke            # its CPU rehearsal
    TRITON_INTERPRET=1 python -m llmaas.benchmarks.engine_throughput --suite cpu-smoke \
        --attention-backend triton --cuda-graphs                                # ... on the CUDA path's code

Cases: ours (continuous batching, paged KV) vs HF ``generate()`` eager, batched and
padded, same dtype; with --adapters N, ours with N distinct LoRA adapters mixed in one
batch vs ours base-only, and PEFT multi-adapter generate as a peer. Every request
generates exactly gen-tokens (EOS ignored). Every side is loaded and warmed on the whole
workload first, then the sides take turns for --repeats rounds (prompts shifted each
round); tok/s is each side's median (range beside it), ratios are median / median.
Runs without Ray: only torch, transformers, peft (the GPU box's stack); run from the
repo root as ``python -m benchmarks.engine_throughput`` when llmaas is not installed.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import tempfile
from collections.abc import Callable

import torch

try:  # installed package, or the bare repo on a GPU box (run from the repo root: engine/ is a plain package)
    from llmaas.benchmarks.common import add_repeats, interleave, print_versus, save, shift, timed, versus
    from llmaas.engine import LORA_TARGET_MODULES, EngineConfig, LLMEngine, SamplingParams
    from llmaas.engine.quantization import MODES as QUANTIZATION_MODES
except ImportError:  # pragma: no cover
    from benchmarks.common import add_repeats, interleave, print_versus, save, shift, timed, versus
    from engine import LORA_TARGET_MODULES, EngineConfig, LLMEngine, SamplingParams
    from engine.quantization import MODES as QUANTIZATION_MODES

CONFIGS = {  # real shapes, random weights: nothing is downloaded
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
}


def build_model(args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model == "default":
        from llmaas.app.config import ModelSettings
        from llmaas.app.model_source import resolve_model

        return AutoModelForCausalLM.from_pretrained(resolve_model(ModelSettings()).path, dtype=torch.float32)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                      **CONFIGS[args.config])
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])  # built in the target dtype: an 8B model never exists in fp32
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gguf_file(args) -> str | None:
    """int4 on the default model: its GGUF file's own blocks (what serving does)."""
    if args.model != "default" or args.quantization != "int4":
        return None
    from llmaas.app.model_source import _default_gguf

    return str(_default_gguf())


def ours_side(model, prompts, args, loras=None, adapters=()) -> Callable[[int], float]:
    """Our engine as a side of interleave(): one generate() over every prompt (shifted per round) per call."""
    # KV sized to the workload on every device: all sides stay loaded at once for interleaved rounds, so the
    # engine must not take a share of all free GPU memory.
    cfg = EngineConfig(max_model_len=args.prompt_tokens + args.gen_tokens + 16, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_batched_tokens, dtype=DTYPES[args.dtype], device=args.device,
                       num_kv_blocks=(len(prompts) * (args.prompt_tokens + args.gen_tokens)) // 16 + 64,
                       max_loras=max(1, len(adapters)), max_lora_rank=args.lora_rank,
                       quantization=args.quantization, gguf_file=gguf_file(args),
                       attention_backend=args.attention_backend, cuda_graphs=args.cuda_graphs)
    engine = LLMEngine(model, cfg)
    for i, path in enumerate(adapters):
        engine.add_lora(f"a{i}", path)
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    vocab = model.config.vocab_size

    def run(r: int) -> None:
        outs = engine.generate([shift(p, r, vocab) for p in prompts], params, loras)
        short = sum(len(o) != args.gen_tokens for o in outs)
        if short:
            raise RuntimeError(f"{short} of {len(outs)} requests did not generate {args.gen_tokens} tokens")
    return timed(run, len(prompts) * args.gen_tokens, lambda: sync(args.device))


def hf_side(model, prompts, args, batch_size: int, adapter_names: list[str] | None = None,
            **generate_kwargs) -> Callable[[int], float]:
    """HF generate (or PEFT's, given a PeftModel and an adapter name per prompt) on equal-length batches (no
    padding needed) as a side of interleave(). ``cache_implementation="static"`` makes transformers compile it on
    its own where the device supports it; the warm-up round compiles every batch shape the measured rounds use."""
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def run(r: int) -> None:
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor([shift(p, r, vocab) for p in prompts[i:i + batch_size]], device=args.device)
            if adapter_names:
                generate_kwargs["adapter_names"] = adapter_names[i:i + batch_size]
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_tokens,
                           min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=0, **generate_kwargs)
    return timed(run, len(prompts) * args.gen_tokens, lambda: sync(args.device))


def make_adapters(model, n: int, rank: int, out_dir) -> list[str]:
    """n random PEFT LoRA adapters (all seven projections) written as PEFT saves them, without copying the model
    (an 8B model would not fit twice)."""
    import json

    from safetensors.torch import save_file

    targets = list(LORA_TARGET_MODULES)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in targets:
                key = f"base_model.model.{name}"
                a = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5  # [r, in]
                b = torch.randn(module.out_features, rank, generator=g) * 0.02  # [out, r]
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        path = f"{out_dir}/a{i}"
        os.makedirs(path, exist_ok=True)
        save_file(tensors, f"{path}/adapter_model.safetensors")
        with open(f"{path}/adapter_config.json", "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
                       "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
                       "base_model_name_or_path": None, "fan_in_fan_out": False, "use_rslora": False}, f)
        paths.append(path)
    return paths


def peft_side(model, prompts, args, adapters, batch_size: int) -> Callable[[int], float]:
    """PEFT's mixed-batch LoRA inference (``adapter_names=`` per row) through HF generate, on a copy of the model
    (PEFT wraps the modules in place; ours shares the originals)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    peft_model = peft_model.to(args.device, DTYPES[args.dtype]).eval()
    names = [f"a{i % len(adapters)}" for i in range(len(prompts))]
    return hf_side(peft_model, prompts, args, batch_size, adapter_names=names)


# Every GPU target of the engine issue in one process (one device session): 1B base, then 8B base + 8 adapters.
SUITES = {
    "gpu": [dict(config="llama-3.2-1b", requests=256, prompt_tokens=128, gen_tokens=128, adapters=0, dtype="bfloat16"),
            dict(config="llama-3.1-8b", requests=64, prompt_tokens=128, gen_tokens=128, adapters=8, dtype="bfloat16")],
    # the same code path on CPU, small enough for a laptop: run it before spending device time
    "cpu-smoke": [dict(config="tiny", requests=16, prompt_tokens=16, gen_tokens=8, adapters=0),
                  dict(config="tiny", requests=8, prompt_tokens=16, gen_tokens=8, adapters=4)],
}


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_case(args) -> list[dict]:
    """Ours vs the peers on one model and workload, in interleaved rounds; returns table rows."""
    model = build_model(args)
    if args.model:
        model = model.to(args.device, DTYPES[args.dtype]).eval()
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    hf_batch = args.hf_batch or args.requests
    label = f"{args.model or args.config} {args.requests}x{args.prompt_tokens}/{args.gen_tokens}"
    if args.quantization != "none":
        label += f" {args.quantization}"
    eager, static = f"HF generate eager (batch {hf_batch})", f"HF generate static cache (batch {hf_batch})"
    peft, mixed = f"PEFT generate adapter_names (batch {hf_batch})", f"{args.adapters} adapters mixed"
    with tempfile.TemporaryDirectory() as d:
        sides = {"ours": ours_side(model, prompts, args), eager: hf_side(model, prompts, args, hf_batch)}
        if args.static_peer:
            sides[static] = hf_side(model, prompts, args, hf_batch, cache_implementation="static")
        if args.adapters:
            paths = make_adapters(model, args.adapters, args.lora_rank, d)
            loras = [f"a{i % args.adapters}" for i in range(len(prompts))]
            sides[mixed] = ours_side(model, prompts, args, loras, paths)
            sides[peft] = peft_side(model, prompts, args, paths, hf_batch)
        runs = interleave(sides, args.repeats)
    rows = [versus(f"{label} base", runs["ours"], peer, runs[peer]) for peer in (eager, static) if peer in runs]
    if args.adapters:
        case = f"{label} {mixed}"
        rows += [versus(case, runs[mixed], "ours base-only", runs["ours"]),
                 versus(case, runs[mixed], peft, runs[peft])]
    del model, sides
    free_memory(args.device)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'default' (SmolLM2) or a checkpoint dir; else --config")
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quantization", default="none", choices=QUANTIZATION_MODES,
                   help="our side's weights (the peers keep --dtype floats)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hf-batch", type=int, default=None, help="HF generate batch size (default: all requests)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--adapters", type=int, default=0, help="mix N distinct LoRA adapters into the batch")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--static-peer", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="also measure HF static-cache (compiled) generate; default on with CUDA")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="our engine's forward: auto = triton (fused weights, Triton kernels) on CUDA, torch on CPU; "
                        "triton on CPU needs TRITON_INTERPRET=1 (Triton's interpreter: a rehearsal, not a speed)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps from captured graphs (default: on for triton on CUDA); on CPU a rehearsal "
                        "replays the captured step eagerly")
    add_repeats(p)
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests of 16/8 tokens, 2 adapters")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="run every case of a suite in one go (gpu: the issue's targets; cpu-smoke: its CPU rehearsal)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the results file, e.g. cpu_smollm2_bf16 or h100_1b")
    args = p.parse_args()
    if args.quick:
        args.config, args.requests, args.prompt_tokens, args.gen_tokens, args.adapters = "tiny", 8, 16, 8, 2
        args.model = None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        rows = []
        for overrides in SUITES[args.suite]:
            case = copy.copy(args)
            vars(case).update(overrides, model=None)
            case_rows = run_case(case)
            print_versus(case_rows, args.repeats)  # progress
            rows += case_rows
    else:
        rows = run_case(args)
    print_versus(rows, args.repeats)
    if not args.no_save:
        name = "engine_throughput" + ("_quick" if args.quick else "") + (f"_{args.suite}" if args.suite else "") \
            + (f"_{args.tag}" if args.tag else "")
        print("saved", save(name, {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
