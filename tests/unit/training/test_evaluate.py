from __future__ import annotations

import pytest

from llmaas.training.config import FineTuneJob
from llmaas.training.evaluate import accuracy, generated_metrics, macro_f1, passes, rouge_l, to_label
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
    ({"epochs": 0}, "epochs"),
    ({"train_files": []}, "train_files"),
    ({"unknown": 1}, "unknown"),
])
def test_job_validation_errors_name_the_field(fields, where):
    from pydantic import ValidationError

    raw = {"name": "ok", "train_files": ["a.jsonl"], **fields}
    with pytest.raises(ValidationError, match=where.replace(".", r"\.")):
        FineTuneJob.model_validate(raw)
