"""LLMServer deployment: the model stage. Wraps the engine; batches every concurrent request."""
from __future__ import annotations

from collections.abc import AsyncIterator

import torch
from ray import serve

from llmaas.app.config import AppConfig
from llmaas.app.errors import InvalidRequest, ServiceUnavailable
from llmaas.app.messages import GenerateRequest, TokenDelta
from llmaas.app.model_source import load_model, resolve_model
from llmaas.deployments.engine import AsyncLLMEngine, EngineDeadError, FinishReason, InvalidRequestError, LLMEngine


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
class LLMServer:
    def __init__(self, config: AppConfig) -> None:
        if config.engine.torch_threads:
            torch.set_num_threads(config.engine.torch_threads)
        model = resolve_model(config.model)
        engine = LLMEngine(load_model(model.path),
                           config.engine.to_engine_config(model.max_model_len, model.eos_token_ids))
        self.engine = AsyncLLMEngine(engine)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Streams token deltas; cancelling the call (client gone, stop string hit) aborts the request."""
        try:
            stream = self.engine.generate(request.request_id, request.prompt_token_ids, request.params)
            async for out in stream:
                if out.finish_reason is FinishReason.ABORT:
                    return
                reason = out.finish_reason.value if out.finish_reason else None
                yield TokenDelta(out.new_token_ids, reason, out.num_prompt_tokens, out.num_output_tokens)
        except InvalidRequestError as exc:
            raise InvalidRequest(str(exc), param="prompt") from None
        except EngineDeadError as exc:
            raise ServiceUnavailable(str(exc)) from None

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
