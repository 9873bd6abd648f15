"""Training data: JSONL rows in chat or prompt/completion form -> token ids with loss masks.

Rows are validated line by line before any worker starts (errors carry the file and
line number). Loss is only on what the model should learn to say: assistant turns
(chat) or the completion (prompt/completion); everything else is labelled -100.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmaas.app.storage import Storage, is_uri, open_location, relative_key

IGNORE = -100  # torch cross-entropy's ignore_index
ROLES = {"system", "developer", "user", "assistant"}


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Row:
    """One validated JSONL row."""

    source: str  # "file:line"
    messages: list[dict[str, str]] | None  # chat form
    prompt: str | None  # prompt/completion form
    completion: str | None


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    prompt_ids: list[int]  # what generation-based eval feeds the model
    reference: str  # the expected answer text


def _parse_row(obj: Any, fmt: str, where: str) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    is_chat = "messages" in obj
    if (fmt == "chat" and not is_chat) or (fmt == "prompt_completion" and is_chat):
        raise DataError(f"{where}: row is not in the '{fmt}' format")
    if is_chat:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a role in {sorted(ROLES)} and string content")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be from the assistant (it is what is learned)")
        return Row(where, [{"role": m["role"], "content": m["content"]} for m in msgs], None, None)
    if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
        raise DataError(f"{where}: needs 'messages' (chat) or string 'prompt' and 'completion' fields")
    if not obj["completion"]:
        raise DataError(f"{where}: 'completion' is empty")
    return Row(where, None, obj["prompt"], obj["completion"])


def read_jsonl(path: str | Path, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Row], int]:
    """Returns (rows, skipped). Raises DataError with the line number unless on_bad_line='skip'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return parse_jsonl(path.name, path.read_bytes(), fmt, on_bad_line)


def parse_jsonl(name: str, data: bytes, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Row], int]:
    """``read_jsonl`` of bytes already in memory (a file read from storage, decrypted if sealed)."""
    rows: list[Row] = []
    skipped = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name}:{lineno}"
        if not raw.strip():
            continue
        try:
            rows.append(_parse_row(json.loads(raw.decode("utf-8")), fmt, where))
        except (json.JSONDecodeError, UnicodeDecodeError, DataError) as exc:
            if on_bad_line == "skip":
                skipped += 1
                continue
            msg = str(exc) if isinstance(exc, DataError) else f"{where}: invalid JSON ({exc})"
            raise DataError(msg) from None
    return rows, skipped


def validate_bytes(data: bytes, name: str = "upload") -> int:
    """Validates an uploaded JSONL file in memory; returns its row count."""
    return validate_lines(data.splitlines(), name)


def validate_lines(lines: Iterable[bytes], name: str = "upload") -> int:
    """Validates JSONL lines (a list, or a binary file read line by line); returns the row count."""
    count = 0
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            _parse_row(json.loads(raw.decode("utf-8")), "auto", where)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: invalid JSON ({exc})") from None
        count += 1
    if not count:
        raise DataError(f"{name}: no rows")
    return count


def _chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True, return_dict=False))


def tokenize_row(tokenizer, row: Row) -> Example:
    """Token ids and labels; loss only on assistant turns / the completion (plus its end token)."""
    if row.messages is not None:
        ids = _chat_ids(tokenizer, row.messages, False)
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(row.messages):
            if m["role"] != "assistant":
                continue
            start = len(_chat_ids(tokenizer, row.messages[:i], True))
            end = len(_chat_ids(tokenizer, row.messages[:i + 1], False))
            labels[start:end] = ids[start:end]
        prompt_ids = _chat_ids(tokenizer, row.messages[:-1], True)
        if ids[:len(prompt_ids)] != prompt_ids:
            raise DataError(f"{row.source}: the chat template is not prefix-stable; cannot mask the prompt")
        return Example(ids, labels, prompt_ids, row.messages[-1]["content"])
    prompt_ids = tokenizer.encode(row.prompt, add_special_tokens=True)
    completion_ids = tokenizer.encode(row.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Example(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids, prompt_ids,
                   row.completion)


def tokenize_rows(tokenizer, rows: list[Row], max_length: int, on_bad_line: str) -> tuple[list[Example], int]:
    examples: list[Example] = []
    skipped = 0
    for row in rows:
        ex = tokenize_row(tokenizer, row)
        if len(ex.input_ids) > max_length:
            if on_bad_line == "skip":
                skipped += 1
                continue
            raise DataError(f"{row.source}: {len(ex.input_ids)} tokens exceeds max_length {max_length}")
        if all(label == IGNORE for label in ex.labels):
            raise DataError(f"{row.source}: nothing to learn (no assistant/completion tokens)")
        examples.append(ex)
    return examples, skipped


def split(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(examples) * share))
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def files_hash(contents: list[bytes]) -> str:
    h = hashlib.sha256()
    for data in contents:
        h.update(data)
    return h.hexdigest()


def pad_batch(batch: dict[str, list[list[int]]], pad_id: int):
    """Right-pads a micro-batch. Returns input_ids, labels, attention_mask: [B, S] long tensors."""
    seqs = [(list(i), list(l)) for i, l in zip(batch["input_ids"], batch["labels"])]
    width = max(len(i) for i, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (i, l) in enumerate(seqs):
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(l)] = torch.tensor(l)
        mask[row, :len(i)] = 1
    return ids, labels, mask


def read_source(path_or_uri: str, storage: Storage) -> tuple[str, bytes]:
    """``(name, bytes)`` of a training file, in memory: through the job's ``storage`` when it lies under its root
    (an uploaded file; decrypted if the root is sealed), else from the path or the s3:// / gs:// object."""
    try:
        if (key := relative_key(storage, path_or_uri)) is not None:
            return key.rpartition("/")[2], storage.read(key)
        if is_uri(path_or_uri):
            parent, _, name = path_or_uri.rpartition("/")
            return name, open_location(parent).read(name)
        return Path(path_or_uri).name, Path(path_or_uri).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path_or_uri}: no such file") from None
    except ValueError as exc:  # a key the storage refuses (hidden or escaping components)
        raise DataError(f"{path_or_uri}: {exc}") from None
