"""The inference engine: plain PyTorch + transformers, no Ray, FastAPI or pydantic.

Shape after nano-vllm: sequence (one request's state), block_manager (KV blocks),
scheduler (who runs this step), model_runner (tensors in, tokens out), model (our
forward over the paged cache), sampler, llm_engine (the glue) and async_engine (an
asyncio front for servers). Importable without installing llmaas: relative imports only.
"""
from .async_engine import AsyncLLMEngine, EngineDeadError
from .config import EngineConfig
from .llm_engine import InvalidRequestError, LLMEngine, RequestFailedError, StepOutput
from .lora import LORA_TARGET_MODULES, AdapterError, check_fits, load_peft_adapter, projection_shapes
from .model import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from .sampler import TokenLogprob
from .sampling_params import SamplingParams
from .sequence import FinishReason

__all__ = [
    "AdapterError", "AsyncLLMEngine", "EngineConfig", "EngineDeadError", "FinishReason", "InvalidRequestError",
    "LLMEngine", "LORA_TARGET_MODULES", "RequestFailedError", "SUPPORTED_ARCHITECTURES", "SamplingParams",
    "StepOutput", "TokenLogprob", "UnsupportedModelError", "check_fits", "load_peft_adapter", "projection_shapes",
]
