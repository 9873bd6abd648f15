"""A quantized base (int4 projections, int8 LM head) with an adapter on top, through the real Serve app."""
from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch
from ray import serve

from llmaas.app.config import EngineSettings
from llmaas.deployments.builder import build_app
from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from tests.integration.conftest import engine_stats, release_root_actors
from tests.models import make_peft_adapter

MESSAGES = [{"role": "user", "content": "Say something."}]
APP_NAME = "quantized-app"


@pytest.fixture(scope="module")
def quantized(ray_cluster, app_args, tiny_chat_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("quant-cache")
    model = {"source": str(tiny_chat_dir), "served_name": "tiny-int4", "cache_dir": str(cache_dir)}
    args = {**app_args, "model": model,
            "engine": {**app_args["engine"], "quantization": "int4"},
            "storage_root": str(tmp_path_factory.mktemp("quant-storage"))}
    serve.run(build_app(args), name=APP_NAME, route_prefix="/quant")
    yield f"{ray_cluster}/quant", args
    serve.delete(APP_NAME)
    release_root_actors(args["storage_root"])


def local_engine(args: dict, tiny_chat_dir) -> LLMEngine:
    """The replica's engine rebuilt in this process: same config, same thread count, and the kernel plan the
    replica measured (read from the cache file it wrote), so the same kernels run."""
    from transformers import AutoModelForCausalLM

    from llmaas.app.model_source import resolve_model
    from llmaas.deployments.config import AppConfig

    config = AppConfig.model_validate(args)
    model = resolve_model(config.model)
    engine_config: EngineConfig = model.engine_config(EngineSettings.model_validate(args["engine"]))
    return LLMEngine(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), engine_config)


def test_an_adapter_on_the_int4_base_serves_what_the_engine_computes(quantized, tiny_chat_dir, default_tokenizer,
                                                                     tmp_path):
    from transformers import AutoModelForCausalLM

    url, args = quantized
    (stats,) = engine_stats(APP_NAME).values()
    assert stats["quantization"] == "int4" and stats["quantized_weight_bytes"] > 0
    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "a", seed=5,
                                b_std=1.0)
    r = httpx.post(f"{url}/v1/adapters", json={"name": "qa", "path": adapter, "promote": True}, timeout=60)
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    served = {model: client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                                    extra_body={"ignore_eos": True}).choices[0].message.content
              for model in ("tiny-int4", "qa")}
    assert served["qa"] != served["tiny-int4"]  # the adapter's delta shows on the quantized base

    threads = torch.get_num_threads()
    torch.set_num_threads(args["engine"]["torch_threads"])  # the replica's, so the cached plan applies
    try:
        engine = local_engine(copy.deepcopy(args), tiny_chat_dir)
    finally:
        torch.set_num_threads(threads)
    assert engine.calibration is not None and engine.calibration.seconds == 0  # the replica's measurement, reused
    engine.add_lora("qa", adapter)
    prompt = default_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for model, lora in (("tiny-int4", None), ("qa", "qa")):
        (ids,) = engine.generate([prompt], params, loras=[lora])
        assert served[model] == default_tokenizer.decode(ids, skip_special_tokens=True), model
