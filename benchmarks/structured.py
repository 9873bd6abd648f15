"""What grammar-constrained decoding costs: the engine with a json_schema guide vs unconstrained, same prompts.

    python -m llmaas.benchmarks.structured [--requests 16] [--max-tokens 128] [--repeats 3]

Sides (interleaved rounds, round 0 warms): the same batch of chat prompts decoded by our engine (default model,
``dtype: auto``) free, and under a 6-field JSON schema (every row guided). Speed = generated tokens / wall time;
the guided rows end when their object closes, the free ones at EOS or max_tokens, so each side counts its own
tokens. Two more sides decode the guided batch on engines that compute the grammar masks during the forward
(``overlap_masks: true``) and after it (``false``): what the overlap buys on this machine (the default engine
picks one by its cores). Also: the time to check +
compile a 20-field schema and build its first mask (what the first request with a new schema pays; later ones
hit the caches).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from llmaas.benchmarks.common import add_repeats, interleave, print_versus, save, versus

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "species", "age", "color", "indoor", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "species": {"enum": ["cat", "dog", "bird"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 30},
                         "color": {"type": "string", "maxLength": 16}, "indoor": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}}


def wide_schema(fields: int) -> dict:
    kinds = [{"type": "string", "maxLength": 32}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
             {"enum": ["a", "b", "c"]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    add_repeats(p)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from llmaas.app import structured
    from llmaas.app.config import EngineSettings, ModelSettings
    from llmaas.app.model_source import load_model, resolve_model
    from llmaas.app.protocol import ResponseFormatJsonSchema
    from llmaas.engine import LLMEngine, SamplingParams

    model = resolve_model(ModelSettings())
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    config = model.engine_config(EngineSettings(device="cpu"))
    engine = LLMEngine(load_model(model.path), config)
    overlap = LLMEngine(load_model(model.path), replace(config, overlap_masks=True))  # masks during the forward
    serial = LLMEngine(load_model(model.path), replace(config, overlap_masks=False))  # masks after it

    def fmt(schema: dict) -> ResponseFormatJsonSchema:
        return ResponseFormatJsonSchema.model_validate({"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})

    structured.guide_tokenizer(model.path, tuple(model.eos_token_ids))  # once per process: not the schema's cost
    start = time.perf_counter()
    wide = structured.grammar_for(fmt(wide_schema(20)))
    checked = time.perf_counter()
    structured.guide_factory(model.path, model.eos_token_ids, wide)().logit_mask(engine.vocab_size)
    compiled = time.perf_counter()
    guide = structured.guide_factory(model.path, model.eos_token_ids, structured.grammar_for(fmt(SCHEMA)))
    animals = ["cat", "dog", "parrot", "hamster", "goldfish", "rabbit", "turtle", "canary"]
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe a {animals[i % len(animals)]} as JSON (name, species, age, "
                                     f"color, indoor, tags). Variant {i}."}],
        add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(args.requests)]

    def side(guided: bool, on: LLMEngine = engine):
        def run(r: int) -> float:
            params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=1000 * r + i,
                                     guide=guide if guided else None) for i in range(len(prompts))]
            t = time.perf_counter()
            outs = on.generate(prompts, params)
            if guided:  # every guided row that ended by itself is the schema's JSON (others ran to max_tokens)
                for o in outs:
                    if len(o) < args.max_tokens:
                        json.loads(tokenizer.decode(o, skip_special_tokens=True))
            return sum(map(len, outs)) / (time.perf_counter() - t)
        return run

    runs = interleave({"json_schema": side(True), "free": side(False), "overlap": side(True, overlap),
                       "serial": side(True, serial)}, args.repeats)
    rows = [versus(f"{args.requests} chats, json_schema vs free", runs["json_schema"], "unconstrained",
                   runs["free"]),
            versus(f"{args.requests} chats, json_schema: masks during vs after the forward", runs["overlap"],
                   "masks after", runs["serial"])]
    print_versus(rows, args.repeats)
    timing = {"check_20_field_schema_ms": 1000 * (checked - start),
              "compile_and_first_mask_ms": 1000 * (compiled - checked)}
    print(f"20-field schema: checked in {timing['check_20_field_schema_ms']:.1f} ms; matcher built and first mask "
          f"in {timing['compile_and_first_mask_ms']:.1f} ms (first use; cached after)")
    if not args.no_save:
        print("saved", save("structured", {"args": vars(args), "rows": rows, **timing}))


if __name__ == "__main__":
    main()
