"""LLMServer deployment: the model stage. Wraps the engine; batches every concurrent request.

Adapters arrive through ``@serve.multiplexed`` keyed by immutable version id
('sentiment@3'), so Serve routes a request to a replica that already holds its
version; loading pushes the adapter into the engine's slot pool, and Serve's LRU
eviction hands it back (after the requests using it finish).
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray import serve

from llmaas.app.adapter_cache import AdapterCache, ChecksumMismatch
from llmaas.app.errors import InvalidRequest, ServiceUnavailable
from llmaas.app.messages import GenerateRequest, TokenDelta
from llmaas.app.model_source import load_model, resolve_model
from llmaas.app.registry import Registry, parse_model_id
from llmaas.app.storage import CorruptObject, StorageUnavailable
from llmaas.app.structured import guide_factory
from llmaas.deployments.config import AppConfig
from llmaas.deployments.metrics import EngineMetrics
from llmaas.engine import (
    AdapterError,
    AsyncLLMEngine,
    EngineDeadError,
    FinishReason,
    InvalidRequestError,
    LLMEngine,
)


class AdapterLease:
    """What the multiplexer caches per adapter version; eviction releases the engine slot."""

    def __init__(self, engine: AsyncLLMEngine, version_id: str, metrics: EngineMetrics) -> None:
        self.engine = engine
        self.version_id = version_id
        self.metrics = metrics

    async def __del__(self) -> None:  # Serve awaits this on LRU eviction
        await self.engine.remove_lora(self.version_id)
        self.metrics.adapter_events.inc(1, {"event": "evict"})


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256,
                  graceful_shutdown_wait_loop_s=0.5)  # see Router's
class LLMServer:
    def __init__(self, config: AppConfig) -> None:
        if config.engine.torch_threads:
            torch.set_num_threads(config.engine.torch_threads)
        model = resolve_model(config.model)
        self.model_path, self.eos_token_ids = model.path, model.eos_token_ids
        engine = LLMEngine(load_model(model.path), model.engine_config(config.engine))
        self.engine = AsyncLLMEngine(engine, gather_s=config.engine.burst_gather_ms / 1e3)
        self.registry = Registry(config.open_storage())
        self.adapters = AdapterCache(self.registry.storage, Path(tempfile.mkdtemp(prefix="llmaas-adapters-")),
                                     int(config.adapter_cache_mb * (1 << 20)))
        self.metrics = EngineMetrics()
        self._reporter: asyncio.Task | None = None
        # Serve caches one lease per version (LRU, at most max_loras); the engine has as many slots behind them.
        async def load(version_id: str) -> AdapterLease:
            return await self._load_adapter(version_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max(1, config.engine.max_loras))(load)

    def _report(self) -> None:
        """Refreshes the engine gauges once a second while the replica serves."""
        if self._reporter is not None and not self._reporter.done():
            return

        async def loop() -> None:
            while True:
                self.metrics.update(self.engine.stats())
                await asyncio.sleep(1.0)

        self._reporter = asyncio.get_running_loop().create_task(loop())

    async def _load_adapter(self, version_id: str) -> AdapterLease:
        name, version = parse_model_id(version_id)
        if version is None:
            raise InvalidRequest(f"adapter id {version_id!r} must name a version", param="model")
        try:  # a first use on this replica may pull the version from object storage: off the event loop
            source = await asyncio.to_thread(lambda: self.adapters.source(self.registry.version(name, version)))
            await self.engine.add_lora(version_id, source if isinstance(source, dict) else str(source))
        except StorageUnavailable as exc:  # the bucket, not the request: retry later
            raise ServiceUnavailable(f"adapter {version_id} cannot be fetched: {exc}", code="storage_unavailable") \
                from None
        except (ChecksumMismatch, CorruptObject) as exc:  # storage holds not what was published: the operator's
            raise ServiceUnavailable(f"adapter {version_id} is corrupt in storage: {exc}", code="adapter_corrupt") \
                from None
        except (AdapterError, OSError) as exc:
            raise InvalidRequest(f"adapter {version_id} cannot be loaded: {exc}", param="model") from None
        self.metrics.adapter_events.inc(1, {"event": "load"})
        return AdapterLease(self.engine, version_id, self.metrics)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Streams token deltas; cancelling the call (client gone, stop string hit) aborts the request."""
        self._report()
        try:
            if request.adapter is not None:
                await self.get_adapter(request.adapter)
            params = request.params
            if request.grammar is not None:  # the grammar the Router checked; its matcher is built off the loop
                guide = await asyncio.to_thread(guide_factory, self.model_path, self.eos_token_ids, request.grammar)
                params = replace(params, guide=guide)
            stream = self.engine.generate(request.request_id, request.prompt_token_ids, params,
                                          request.adapter, request.cache_salt, request.stream_interval_s)
            async for out in stream:
                if out.finish_reason is FinishReason.ABORT:
                    return
                reason = out.finish_reason.value if out.finish_reason else None
                yield TokenDelta(out.new_token_ids, reason, out.num_prompt_tokens, out.num_output_tokens, out.logprobs,
                                 out.prompt_logprobs, out.num_cached_tokens)
        except InvalidRequestError as exc:  # the request's own data, also a fault inside a step: 400 (in-band)
            raise InvalidRequest(str(exc), param=exc.param) from None
        except EngineDeadError as exc:
            raise ServiceUnavailable(str(exc)) from None

    def stats(self) -> dict[str, float | str]:
        engine = self.engine.engine
        return {**self.engine.stats(), "node_id": ray.get_runtime_context().get_node_id(),
                "replica": serve.get_replica_context().replica_id.unique_id,
                "quantization": engine.config.quantization, "quantized_weight_bytes": engine.quantized_bytes}

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        adapters = getattr(self, "adapters", None)
        if adapters is not None:
            shutil.rmtree(adapters.cache_dir, ignore_errors=True)
