from __future__ import annotations

from pathlib import Path

import pytest

from llmaas.training.config import FineTuneJob
from llmaas.training.evaluate import (
    accuracy,
    evaluate,
    generated_metrics,
    macro_f1,
    passes,
    rouge_l,
    to_label,
)
from llmaas.training.recipe import lr_at


def test_accuracy_and_macro_f1_on_a_known_case():
    labels = ["pos", "neg", "neu"]
    refs = ["pos", "pos", "neg", "neg", "neu", "neu"]
    preds = ["pos", "neg", "neg", "neg", "neu", None]
    assert accuracy(preds, refs) == pytest.approx(4 / 6)
    # pos: tp1 fp0 fn1 -> 2/3; neg: tp2 fp1 fn0 -> 4/5; neu: tp1 fp0 fn1 -> 2/3
    assert macro_f1(preds, refs, labels) == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 3)


@pytest.mark.parametrize("text, label", [
    ("Positive.", "positive"), (" negative\n", "negative"), ("positive sentiment", "positive"),
    ("I think it is good", None),
])
def test_generated_text_to_label(text, label):
    assert to_label(text, ["positive", "negative"]) == label


def test_rouge_l_and_exact_match():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["the cat"], ["the cat sat down"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    m = generated_metrics(["Paris.", "Rome"], ["paris", "Madrid"], ["exact_match"], None)
    assert m == {"exact_match": 0.5}


@pytest.mark.parametrize("metrics, thresholds, ok", [
    ({"accuracy": 0.9}, {"accuracy": 0.8}, True),
    ({"accuracy": 0.7}, {"accuracy": 0.8}, False),
    ({"loss": 0.5}, {"loss": 0.6}, True),
    ({"loss": 0.7}, {"loss": 0.6}, False),
    ({}, {"accuracy": 0.1}, False),
])
def test_threshold_gate(metrics, thresholds, ok):
    assert passes(metrics, thresholds)[0] is ok


def test_lr_schedule_warmup_then_cosine_to_zero():
    job = FineTuneJob(name="x", train_files=["a"], learning_rate=1.0, warmup_ratio=0.1, lr_schedule="cosine")
    lrs = [lr_at(s, 100, job) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("fields, where", [
    ({"name": "Bad Name"}, "name"),
    ({"name": "../x"}, "name"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"eval": {"metrics": ["accuracy"]}}, "labels"),
    ({"eval": {"metrics": ["json_valid_grammar"]}}, "json_schema"),
    ({"eval": {"metrics": ["json_valid"], "json_schema": {"type": "no-such-type"}}}, "json_schema"),
    ({"epochs": 0}, "epochs"),
    ({"train_files": []}, "train_files"),
    ({"unknown": 1}, "unknown"),
])
def test_job_validation_errors_name_the_field(fields, where):
    from pydantic import ValidationError

    raw = {"name": "ok", "train_files": ["a.jsonl"], **fields}
    with pytest.raises(ValidationError, match=where.replace(".", r"\.")):
        FineTuneJob.model_validate(raw)


ORDER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["item", "quantity"],
                "properties": {"item": {"type": "string", "maxLength": 8},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 99}}}


def test_json_metrics_count_valid_objects_and_exact_fields():
    refs = ['{"item":"tent","quantity":2}'] * 4
    texts = ['{"item": "tent", "quantity": 2}',  # valid, both fields right
             '{"item":"tent","quantity":3}',  # valid, one field right
             '{"item":"tent","quantity":"2"}',  # a string quantity breaks the schema: counts as no answer
             "Sure! Here is your order: tent x2"]
    m = generated_metrics(texts, refs, ["json_valid", "field_accuracy"], None, ORDER_SCHEMA)
    assert m == {"json_valid": 0.5, "field_accuracy": pytest.approx((1 + 0.5) / 4)}
    assert generated_metrics(texts[2:3], refs[:1], ["json_valid"], None) == {"json_valid": 1.0}  # no schema


def test_eval_under_the_grammar_always_answers_in_the_schema(tiny_chat_dir):
    """A random model's free answers are not JSON; decoded under the schema's grammar every one is."""
    from transformers import AutoTokenizer

    from llmaas.training.data import read_jsonl, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    rows, _ = read_jsonl(Path(__file__).resolve().parents[3] / "training/examples/extract/val.jsonl")
    examples, _ = tokenize_rows(tokenizer, rows[:8], 256, "error")
    m = evaluate(str(tiny_chat_dir), None, examples, tokenizer, ["json_valid", "json_valid_grammar",
                                                                 "field_accuracy_grammar"], None, 48, 8,
                 ORDER_SCHEMA | {"required": ["item", "quantity", "city"],
                                 "properties": {**ORDER_SCHEMA["properties"], "city": {"type": "string",
                                                                                       "maxLength": 8}}})
    assert m["json_valid"] == 0.0 and m["json_valid_grammar"] == 1.0
    assert 0.0 <= m["field_accuracy_grammar"] < 1.0
