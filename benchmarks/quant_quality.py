"""What weight quantization costs in quality, on the default model: one table, every mode, one run.

    python -m llmaas.benchmarks.quant_quality [--adapter DIR] [--prompts 100] [--modes float32,fp8]

Per mode (float32 = full precision; the others in the compute dtype ``dtype: auto`` picks here):
- perplexity on a held text no adapter trained on: the module docstrings of a fixed list of Python standard
  library modules (shipped with every Python; ~8k tokens), in 512-token windows, scored through the engine
  (its prompt log-probabilities: the kernels serving picks, not the HF forward's), twice: with the default
  step budget (prefill-sized kernel calls) and with 32 tokens a step (every call at most 32 rows: the kernels a
  batch-32 decode step runs, which the calibration may choose differently);
- greedy agreement with float32 over ``--prompts`` prompts (lines of that text, 32 new tokens each): the share
  of prompts whose whole continuation is identical, and the mean share of tokens before the first difference;
- with ``--adapter`` (e.g. the sentiment adapter ``llmaas finetune training/examples/sentiment/job.yaml``
  trains), that adapter's accuracy on its validation set, served on each base;
- the bytes the model's weights take.
Budgets (issue 13): int8 (and fp8) perplexity within 1% of float32, int4 within 5%, adapter accuracy within a
point. fp8 is a GPU format: here it runs as dequantize + GEMM, which scores the format, not a GPU's kernels.
"""
from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import replace
from pathlib import Path

import torch

from llmaas.benchmarks.common import save
from llmaas.engine import EngineConfig, LLMEngine, SamplingParams

HELD_MODULES = ("argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib",
                "email", "functools", "heapq", "inspect", "json", "logging", "os", "pathlib", "pickle", "random",
                "re", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
                "typing", "unittest", "urllib.parse", "zipfile")
WINDOW = 512
DECODE_ROWS = 32  # the second score's step budget: every kernel call sees at most 32 rows, as in a batch-32 decode
SENTIMENT = Path(__file__).resolve().parents[1] / "training" / "examples" / "sentiment"


def held_text() -> str:
    docs = [importlib.import_module(name).__doc__ or "" for name in HELD_MODULES]
    return "\n\n".join(d.strip() for d in docs if d.strip())


def weight_bytes(model: torch.nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # tied weights and views once
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    """Through the engine (the kernels serving runs, chosen per batch size), not the HF forward: each window a
    prompt whose tokens' log-probabilities the engine reports (``prompt_logprobs``)."""
    windows = [ids[start:start + WINDOW + 1] for start in range(0, len(ids) - 1, WINDOW)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for i, window in enumerate(windows):
        engine.add_request(f"ppl-{i}", window, params)
    nll, count = 0.0, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise out.error
            for entry in out.prompt_logprobs or ():
                nll, count = nll - entry.logprob, count + 1
    assert count == sum(len(w) - 1 for w in windows)
    return math.exp(nll / count)


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of identical continuations, mean share of tokens before the first difference)."""
    same, prefix = 0, 0.0
    for a, b in zip(ours, reference):
        same += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n / max(len(b), 1)
    return same / len(reference), prefix / len(reference)


def adapter_accuracy(engine: LLMEngine, adapter: str, tokenizer) -> float:
    from llmaas.training.data import read_jsonl, tokenize_rows
    from llmaas.training.evaluate import generated_metrics

    rows, _ = read_jsonl(SENTIMENT / "val.jsonl")
    examples, _ = tokenize_rows(tokenizer, rows, 128, "error")
    if not engine.has_lora("eval"):
        engine.add_lora("eval", adapter)
    outs = engine.generate([e.prompt_ids for e in examples], SamplingParams(max_tokens=4, temperature=0.0),
                           ["eval"] * len(examples))
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return generated_metrics(texts, [e.reference for e in examples], ["accuracy"], ["positive", "negative"])["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="a PEFT adapter trained on the default model (sentiment) to score per base")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", help="comma-separated rows to run (default: all); the first is the reference")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from llmaas.app.config import EngineSettings, ModelSettings
    from llmaas.app.model_source import load_model, resolve_model

    model = resolve_model(ModelSettings())
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    text = held_text()
    ids = tokenizer.encode(text)
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 40]
    prompts = [tokenizer.encode(line) for line in lines[:args.prompts]]
    auto = EngineSettings(device="cpu").resolved_dtype("cpu")
    modes = [("float32", "none", "float32", False), (f"{auto}", "none", auto, False),
             ("int8", "int8", auto, False), ("int4 (g32)", "int4", auto, False),
             ("int4 (GGUF Q4_1 blocks)", "int4", auto, True), ("fp8", "fp8", auto, False)]
    modes = list({m[0]: m for m in modes}.values())  # auto may be float32: one row
    if args.modes:
        wanted, names = args.modes.split(","), [m[0] for m in modes]
        if not set(wanted) <= set(names):
            p.error(f"--modes: pick from {names}")
        modes = [m for name in wanted for m in modes if m[0] == name]
    print(f"held text: {len(ids)} tokens from {len(HELD_MODULES)} stdlib docstrings; {len(prompts)} prompts; "
          f"compute dtype for the quantized rows: {auto} (dtype: auto here)")
    rows, reference = [], None
    for name, quantization, dtype, gguf in modes:
        settings = EngineSettings(device="cpu", dtype=dtype, quantization=quantization, max_loras=1)
        config: EngineConfig = settings.to_engine_config(model.max_model_len, model.eos_token_ids,
                                                         model.gguf if gguf else None)
        engine = LLMEngine(load_model(model.path), config)
        small = LLMEngine(load_model(model.path), replace(config, max_num_batched_tokens=DECODE_ROWS,
                                                                max_num_seqs=DECODE_ROWS))
        row = {"mode": name, "quantization": quantization, "dtype": dtype,
               "weight_mb": weight_bytes(engine.model.hf_model) / 1e6,
               "perplexity": perplexity(engine, ids), "perplexity_32_rows": perplexity(small, ids)}
        del small
        outs = engine.generate(prompts, SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True))
        reference = reference or outs
        row["same_continuations"], row["agreeing_prefix"] = agreement(outs, reference)
        if args.adapter:
            row["adapter_accuracy"] = adapter_accuracy(engine, args.adapter, tokenizer)
        rows.append(row)
        print(row, flush=True)
    base = rows[0]
    vs = f"vs {base['mode']}"
    print(f"\n| mode | weights MB | perplexity | {vs} | perplexity, {DECODE_ROWS}-row steps | {vs} | "
          f"identical greedy | agreeing prefix |{' adapter accuracy |' if args.adapter else ''}")
    print(f"|---|---|---|---|---|---|---|---|{'---|' if args.adapter else ''}")
    for r in rows:
        extra = f" {r['adapter_accuracy']:.3f} |" if args.adapter else ""
        print(f"| {r['mode']} | {r['weight_mb']:.0f} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {r['perplexity_32_rows']:.3f} | "
              f"{100 * (r['perplexity_32_rows'] / base['perplexity_32_rows'] - 1):+.2f}% | "
              f"{r['same_continuations']:.2f} | {r['agreeing_prefix']:.2f} |{extra}")
    if not args.no_save:
        name = "quant_quality" + (f"_{args.modes.replace(',', '_')}" if args.modes else "")  # a subset: its own file
        print("saved", save(name, {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
