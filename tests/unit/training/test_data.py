"""Training data: line-numbered errors, skipping, and loss masks on the real default tokenizer."""
from __future__ import annotations

import json

import pytest

from llmaas.training.data import IGNORE, DataError, read_jsonl, tokenize_row, tokenize_rows, validate_bytes

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Goodbye."}]}
PC = {"prompt": "2+2=", "completion": "4"}


def write(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "data.jsonl:2: invalid JSON"),
    ('{"prompt": "x"}', "data.jsonl:2: needs 'messages'"),
    ('{"messages": []}', "data.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "data.jsonl:2: the last message must be from the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "data.jsonl:2: messages[0] needs a role"),
    ('[1, 2]', "data.jsonl:2: expected a JSON object"),
    ('{"prompt": "x", "completion": ""}', "data.jsonl:2: 'completion' is empty"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = write(tmp_path, [json.dumps(PC), bad_line, json.dumps(PC)])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        read_jsonl(path)
    rows, skipped = read_jsonl(path, on_bad_line="skip")
    assert (len(rows), skipped) == (2, 1)


def test_format_mismatch_and_missing_file(tmp_path):
    path = write(tmp_path, [json.dumps(CHAT)])
    with pytest.raises(DataError, match="not in the 'prompt_completion' format"):
        read_jsonl(path, fmt="prompt_completion")
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_chat_loss_only_on_assistant_turns(tmp_path, default_tokenizer):
    rows, _ = read_jsonl(write(tmp_path, [json.dumps(CHAT)]))
    ex = tokenize_row(default_tokenizer, rows[0])
    learned = default_tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert "Hello!" in learned and "Goodbye." in learned
    assert "Hi" not in learned and "Bye" not in learned and "Be brief" not in learned
    assert learned.count("<|im_end|>") == 2  # each assistant turn learns to end itself
    assert ex.reference == "Goodbye."
    assert ex.input_ids[:len(ex.prompt_ids)] == ex.prompt_ids


def test_prompt_completion_masks_prompt(tmp_path, default_tokenizer):
    rows, _ = read_jsonl(write(tmp_path, [json.dumps(PC)]))
    ex = tokenize_row(default_tokenizer, rows[0])
    n_prompt = len(default_tokenizer.encode("2+2="))
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == default_tokenizer.eos_token_id


def test_over_long_rows_error_or_skip(tmp_path, default_tokenizer):
    long = {"prompt": "word " * 300, "completion": "x"}
    rows, _ = read_jsonl(write(tmp_path, [json.dumps(PC), json.dumps(long)]))
    with pytest.raises(DataError, match="data.jsonl:2: .* exceeds max_length 64"):
        tokenize_rows(default_tokenizer, rows, 64, "error")
    examples, skipped = tokenize_rows(default_tokenizer, rows, 64, "skip")
    assert (len(examples), skipped) == (1, 1)


@pytest.mark.parametrize("data, message", [
    (b"", "no rows"),
    (b"\n\n", "no rows"),
    (b'{"prompt": "a", "completion": "b"}\n\xff\xfe', "upload:2: invalid JSON"),
])
def test_validate_bytes(data, message):
    with pytest.raises(DataError, match=message):
        validate_bytes(data)
