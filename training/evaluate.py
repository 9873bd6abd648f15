"""Evaluation on the validation set: loss/perplexity (teacher forcing) and generated-answer metrics.

Generation runs on the serving engine itself (greedy, batched, adapter in a LoRA slot),
which equals PEFT's greedy output token for token, so eval scores what serving will say.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llmaas.app.structured import grammar_for_schema, guide_factory
from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from llmaas.training.data import IGNORE, Example, pad_batch


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?\"'")


def to_label(generated: str, labels: Sequence[str]) -> str | None:
    """The label the generated text names (exact, else the first label it starts with)."""
    g = normalize(generated)
    by_norm = {normalize(lbl): lbl for lbl in labels}
    if g in by_norm:
        return by_norm[g]
    for norm, lbl in sorted(by_norm.items(), key=lambda kv: -len(kv[0])):
        if g.startswith(norm):
            return lbl
    return None


def accuracy(preds: Sequence[str | None], refs: Sequence[str]) -> float:
    return sum(p == r for p, r in zip(preds, refs)) / max(1, len(refs))


def macro_f1(preds: Sequence[str | None], refs: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-label F1; an unparseable prediction counts as wrong for every label."""
    scores = []
    for lbl in labels:
        tp = sum(p == lbl and r == lbl for p, r in zip(preds, refs))
        fp = sum(p == lbl and r != lbl for p, r in zip(preds, refs))
        fn = sum(p != lbl and r == lbl for p, r in zip(preds, refs))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / max(1, len(refs))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over whitespace tokens (Lin, 2004)."""
    total = 0.0
    for p, r in zip(preds, refs):
        pt, rt = normalize(p).split(), normalize(r).split()
        lcs = _lcs(pt, rt)
        if lcs:
            prec, rec = lcs / len(pt), lcs / len(rt)
            total += 2 * prec * rec / (prec + rec)
    return total / max(1, len(refs))


@torch.no_grad()
def mean_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over label tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, labels, mask = pad_batch({"input_ids": [e.input_ids for e in chunk],
                                       "labels": [e.labels for e in chunk]}, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += int((target != IGNORE).sum())
    return total / max(1, count)


def parse_answer(text: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The answer as a JSON object that follows ``schema`` (any object without one), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    try:
        jsonschema.validate(value, schema or {})
    except jsonschema.ValidationError:
        return None
    return value


def field_accuracy(answers: Sequence[dict[str, Any] | None], refs: Sequence[str]) -> float:
    """Mean share of each reference object's top-level fields the answer has with exactly the same value."""
    scores = []
    for answer, ref in zip(answers, refs):
        gold = parse_answer(ref, None)  # a reference that is no JSON object scores 0: nothing to match
        if answer is None or not gold:
            scores.append(0.0)
        else:
            scores.append(sum(answer.get(k) == v for k, v in gold.items()) / len(gold))
    return sum(scores) / max(1, len(scores))


def generated_metrics(texts: list[str], refs: list[str], metrics: Sequence[str],
                      labels: Sequence[str] | None, json_schema: dict[str, Any] | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    if "json_valid" in metrics or "field_accuracy" in metrics:
        answers = [parse_answer(t, json_schema) for t in texts]
        if "json_valid" in metrics:
            out["json_valid"] = sum(a is not None for a in answers) / max(1, len(answers))
        if "field_accuracy" in metrics:
            out["field_accuracy"] = field_accuracy(answers, refs)
    if labels:
        preds = [to_label(t, labels) for t in texts]
        gold = [to_label(r, labels) or r for r in refs]
        if "accuracy" in metrics:
            out["accuracy"] = accuracy(preds, gold)
        if "macro_f1" in metrics:
            out["macro_f1"] = macro_f1(preds, gold, labels)
    if "exact_match" in metrics:
        out["exact_match"] = exact_match(texts, refs)
    if "rouge_l" in metrics:
        out["rouge_l"] = rouge_l(texts, refs)
    return out


GENERATED = ("accuracy", "macro_f1", "exact_match", "rouge_l", "json_valid", "field_accuracy")
GRAMMAR = "_grammar"  # a metric's name with this suffix: the answers decoded under eval.json_schema's grammar


def evaluate(base_path: str, adapter_dir: str | None, examples: list[Example], tokenizer, metrics: Sequence[str],
             labels: Sequence[str] | None, max_new_tokens: int, max_examples: int,
             json_schema: dict[str, Any] | None = None) -> dict[str, float]:
    """Scores the base model (adapter_dir=None) or base + adapter on ``examples``."""
    if not examples:
        return {}
    out: dict[str, float] = {}
    base = AutoModelForCausalLM.from_pretrained(base_path, use_safetensors=True, dtype=torch.float32).eval()
    if {"loss", "perplexity"} & set(metrics):
        model = base
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(base, adapter_dir).eval()
        loss = mean_loss(model, examples, tokenizer.pad_token_id or 0)
        if adapter_dir is not None:
            model.unload()  # gives the base back without LoRA layers for the engine below
        out["loss"], out["perplexity"] = loss, math.exp(min(loss, 50.0))
    gen_metrics = [m for m in metrics if m.removesuffix(GRAMMAR) in GENERATED]
    if gen_metrics:
        subset = examples[:max_examples]
        rank = 1
        if adapter_dir is not None:
            rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        engine = LLMEngine(base, EngineConfig(
            max_model_len=min(2048, max(len(e.prompt_ids) for e in subset) + max_new_tokens + 1),
            max_num_seqs=32, max_loras=1, max_lora_rank=rank,
            eos_token_ids=tuple(x for x in [tokenizer.eos_token_id] if x is not None)))
        lora = None
        if adapter_dir is not None:
            engine.add_lora("candidate", adapter_dir)
            lora = "candidate"
        refs = [e.reference for e in subset]

        def answers(params: SamplingParams) -> list[str]:
            outs = engine.generate([e.prompt_ids for e in subset], params, [lora] * len(subset))
            return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        free = [m for m in gen_metrics if not m.endswith(GRAMMAR)]
        if free:
            out.update(generated_metrics(answers(params), refs, free, labels, json_schema))
        constrained = [m.removesuffix(GRAMMAR) for m in gen_metrics if m.endswith(GRAMMAR)]
        if constrained:
            guide = guide_factory(base_path, engine.config.eos_token_ids,
                                  grammar_for_schema(json_schema or {}, "eval.json_schema"))
            scores = generated_metrics(answers(replace(params, guide=guide)), refs, constrained, labels, json_schema)
            out.update({name + GRAMMAR: value for name, value in scores.items()})
    return out


def passes(metrics: dict[str, float], thresholds: dict[str, float]) -> tuple[bool, list[str]]:
    """Whether every threshold holds (loss/perplexity: at most; others: at least); failures are listed."""
    failures = []
    for name, bound in thresholds.items():
        value = metrics.get(name)
        lower_is_better = name in ("loss", "perplexity")
        ok = value is not None and (value <= bound if lower_is_better else value >= bound)
        if not ok:
            failures.append(f"{name}={value} {'>' if lower_is_better else '<'} {bound}")
    return not failures, failures
