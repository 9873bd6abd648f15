"""Single-stream generation speed: one request, P prompt / G generated tokens (EOS ignored), greedy.

    pip install llama-cpp-python   # optional peer (compiles llama.cpp, ~3 min on 2 cores)
    python -m llmaas.benchmarks.single_stream --dtype bfloat16 --threads 2
    python -m llmaas.benchmarks.single_stream --dtype auto --quantization int4   # + ours in the other dtype

Peers in the same run: HF ``generate()`` (batch 1, same dtype) and, when ``llama_cpp``
is importable, llama.cpp on the default model's own GGUF file (the one our safetensors
copy is converted from; it is Q4_1, so llama.cpp streams ~4x fewer weight bytes per
token than bf16 does — on a memory-bound single stream that is most of the gap).
Every side is warmed at the measured shape, then the sides take turns for ``--repeats``
rounds (a new prompt of the same length each round); each side's median and range are
reported, and ratios are median / median. ``--dtype auto`` runs ours in what ``engine.dtype: auto`` resolves to
on this machine (its startup probe) and, as a peer, in the other float dtype: whether auto picked the faster.
Speed = generated tokens / wall time of the whole request (prefill included).
"""
from __future__ import annotations

import argparse
import random

import torch

from llmaas.benchmarks.common import add_repeats, interleave, print_versus, save, shift, timed, versus
from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from llmaas.engine.quantization import MODES as QUANTIZATION_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES) + ["auto"],
                   help="auto: what engine.dtype auto picks here, with ours in the other dtype as a peer")
    p.add_argument("--quantization", default="none", choices=QUANTIZATION_MODES,
                   help="our engine's weights (int4: the GGUF file's own Q4_1 blocks); HF keeps --dtype floats")
    p.add_argument("--threads", type=int, default=2)
    add_repeats(p)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import _default_gguf, resolve_model

    model = resolve_model(ModelSettings())
    path = model.path
    other = None
    if args.dtype == "auto":
        from llmaas.app.config import EngineSettings

        args.dtype = EngineSettings(device="cpu", quantization=args.quantization).resolved_dtype(
            "cpu", path, str(model.cache_dir / "kernels.json"))
        other = {"float32": "bfloat16", "bfloat16": "float32"}[args.dtype]
        print(f"dtype auto -> {args.dtype} on this machine")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).eval()
    vocab = hf_model.config.vocab_size
    prompt = [random.Random(0).randrange(1, vocab) for _ in range(args.prompt_tokens)]
    n = args.gen_tokens

    def our_engine(dtype: str) -> LLMEngine:
        return LLMEngine(AutoModelForCausalLM.from_pretrained(path), EngineConfig(
            max_model_len=args.prompt_tokens + n + 16, dtype=DTYPES[dtype], num_kv_blocks=64,
            quantization=args.quantization, gguf_file=str(_default_gguf()) if args.quantization == "int4" else None,
            kernel_cache_file=str(model.cache_dir / "kernels.json")))
    engine = our_engine(args.dtype)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    @torch.inference_mode()
    def hf(r: int) -> None:
        ids = torch.tensor([shift(prompt, r, vocab)])
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)

    sides = {"ours": timed(lambda r: engine.generate([shift(prompt, r, vocab)], params), n),
             "HF generate (batch 1)": timed(hf, n)}
    if other is not None:
        peer = our_engine(other)
        sides[f"ours in {other} (auto's other choice)"] = timed(lambda r: peer.generate([shift(prompt, r, vocab)],
                                                                                        params), n)
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp not installed: llama.cpp peer skipped (pip install llama-cpp-python)")
    else:
        gguf = _default_gguf()
        llm = llama_cpp.Llama(model_path=str(gguf), n_threads=args.threads, n_ctx=args.prompt_tokens + n + 16,
                              verbose=False)

        def cpp(r: int) -> None:
            llm.reset()
            for i, _ in enumerate(llm.generate(shift(prompt, r, vocab), top_k=1, temp=0.0, reset=True)):
                if i + 1 == n:
                    break

        sides[f"llama.cpp {llama_cpp.__version__} ({gguf.name})"] = timed(cpp, n)
    runs = interleave(sides, args.repeats)
    ours = runs.pop("ours")
    case = f"single stream {'auto: ' if other else ''}{args.dtype}"
    case += f" {args.quantization}" if args.quantization != "none" else ""
    rows = [versus(case, ours, peer, theirs) for peer, theirs in runs.items()]
    print_versus(rows, args.repeats)
    if not args.no_save:
        name = "single_stream" + (f"_{args.quantization}" if args.quantization != "none" else "")
        print("saved", save(name, {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
