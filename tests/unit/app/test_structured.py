"""response_format as grammar-constrained decoding: the engine samples only what the grammar allows."""
from __future__ import annotations

import json

import pytest
import torch

from llmaas.app.errors import InvalidRequest
from llmaas.app.protocol import ChatCompletionRequest
from llmaas.app.structured import grammar_for, guide_factory
from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from tests.models import tiny_llama

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["mood", "score"], "additionalProperties": False}


def response_format(schema) -> object:
    return ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "mood", "schema": schema}}}
    ).response_format


def test_invalid_schemas_are_400_before_any_model_time():
    with pytest.raises(InvalidRequest) as err:
        grammar_for(response_format({"type": "no-such-type"}))
    assert err.value.param == "response_format"
    assert grammar_for(None) is None
    assert grammar_for(response_format(SCHEMA)) is grammar_for(response_format(dict(SCHEMA)))  # compiled once
    reordered = dict(reversed(SCHEMA["properties"].items()))  # properties keep the schema's order
    assert grammar_for(response_format(SCHEMA | {"properties": reordered})) != grammar_for(response_format(SCHEMA))


def test_guided_rows_follow_the_schema_and_unguided_rows_are_untouched(default_model_dir, default_tokenizer):
    """A random tiny Llama with the default tokenizer: left alone it writes noise; guided, every sampled and
    greedy row is JSON of the schema, ending by itself (stop, not length), while a free row in the same batch
    generates exactly what it does alone."""
    model = tiny_llama(seed=5, vocab_size=len(default_tokenizer), max_position_embeddings=256)
    engine = LLMEngine(model, EngineConfig(max_model_len=256, num_kv_blocks=128, eos_token_ids=(2,)))
    guide = guide_factory(str(default_model_dir), (2,), grammar_for(response_format(SCHEMA)))
    prompt = default_tokenizer.encode("Rate your mood:")
    free = SamplingParams(max_tokens=12, temperature=0.0)
    (alone,) = engine.generate([prompt], free)
    guided = [SamplingParams(max_tokens=64, temperature=t, seed=i, guide=guide) for i, t in enumerate((0, 1, 1, 1))]
    outs = engine.generate([prompt] * 5, [free, *guided])
    assert outs[0] == alone
    for out in outs[1:]:
        value = json.loads(default_tokenizer.decode(out, skip_special_tokens=True))
        assert set(value) == {"mood", "score"} and value["mood"] in ("happy", "sad") and 0 <= value["score"] <= 9
        assert len(out) < 64  # the grammar ended it


def test_json_object_allows_exactly_one_json_object(default_model_dir, default_tokenizer):
    fmt = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "response_format": {"type": "json_object"}}).response_format
    g = guide_factory(str(default_model_dir), (2,), grammar_for(fmt))()
    for token in default_tokenizer.encode('{"a":[1,{"b":null}]}'):
        assert g.logit_mask(len(default_tokenizer))[token] == 0 and not g.is_finished()
        g.accept(token)
    assert g.is_finished()  # nothing may follow the object


def test_a_guide_masks_exactly_its_grammar(default_model_dir, default_tokenizer):
    g = guide_factory(str(default_model_dir), (2,), grammar_for(response_format(SCHEMA)))()
    mask = g.logit_mask(len(default_tokenizer) + 7)  # padded embedding rows are never allowed
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, float("-inf")}
    allowed = mask == 0
    assert not allowed[-7:].any()
    texts = {default_tokenizer.decode([t]) for t in allowed.nonzero()[:, 0].tolist()}
    assert texts and all(t.startswith("{") for t in texts)
    with pytest.raises(ValueError):
        g.accept(default_tokenizer.encode("x")[0])
