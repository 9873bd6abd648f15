"""An asyncio front for LLMEngine: one background thread steps the engine.

Callers ``async for`` over ``generate()``; token deltas arrive through a
per-request asyncio.Queue. Adds and aborts are handed to the engine thread
through a locked inbox and applied between steps, so the engine itself needs no
locks. A consumer that lags gets its queued deltas merged into one, which keeps
per-token message overhead off the hot path under load.

When the engine is idle and requests come in a burst (a client fanning out, a batch job), the first would start
a prefill step alone and the rest wait that whole step: with ``gather_s`` the thread first waits while more keep
coming, each within ``gather_s`` of the last, so the burst starts as one step.

The engine thread is meant to be the only thread of the process that runs torch's
parallel regions: the thread that builds this front (which loaded the model) and the
event loop's thread hand back their OpenMP pools (see openmp.py), which on a
2-core box is the difference between 0.6x and 1.0x of a bare loop's tokens/s.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from . import openmp
from .llm_engine import InvalidRequestError, LLMEngine, RequestFailedError, StepOutput
from .sampling_params import SamplingParams

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    pass


def merge(outputs: list[StepOutput]) -> StepOutput:
    """Folds consecutive deltas of one request into one."""
    last = outputs[-1]
    tokens = [t for o in outputs for t in o.new_token_ids]
    logprobs = [lp for o in outputs for lp in o.logprobs] if last.logprobs is not None else None
    prompt = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return StepOutput(last.request_id, tokens, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens,
                      logprobs, prompt, num_cached_tokens=last.num_cached_tokens)


MAX_GATHER_GAPS = 8  # an idle engine waits for a burst at most this many gather_s gaps (AsyncLLMEngine)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, gather_s: float = 0.0) -> None:
        """``gather_s``: when requests wake an idle engine, wait until none has come for this long (at most
        MAX_GATHER_GAPS times it) before the first step; 0 steps at once. A lone request pays it once."""
        if gather_s < 0:
            raise ValueError(f"gather_s must be >= 0, got {gather_s}")
        self.engine = engine
        self.gather_s = gather_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox_add: list[tuple[str, list[int], SamplingParams, str | None, str | None]] = []
        self._inbox_abort: list[str] = []
        self._inbox_calls: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._pending_removals: set[str] = set()  # adapters to forget once no request uses them
        self.adapter_loads = 0  # adapters read from disk since start
        self.error: BaseException | None = None
        openmp.release_pool()  # this thread loaded (and probed) the model: its OpenMP workers would throttle ours

    # ----- asyncio side -----
    def _ensure_started(self) -> None:
        if self.error is not None:
            raise _dead(self.error)
        if self._thread is None:
            openmp.release_pool()  # the loop's thread, where it is not the one that built this front
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="llmaas-engine", daemon=True)
            self._thread.start()
        elif asyncio.get_running_loop() is not self._loop:  # deltas go to the first loop: this one would hang
            raise RuntimeError("AsyncLLMEngine serves the event loop it started on; create one per loop")

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the engine thread between two steps (e.g. ``lambda: engine.add_lora(...)``)."""
        self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.error is not None:  # the loop died after the check above: nobody would settle it
                raise _dead(self.error)
            self._inbox_calls.append((fn, future))
        self._wake.set()
        return await future

    async def add_lora(self, name: str, path: str | Mapping[str, bytes]) -> None:
        """Registers an adapter (idempotent); cancels a pending removal of the same name."""
        def add() -> None:
            self._pending_removals.discard(name)
            if not self.engine.has_lora(name):
                self.engine.add_lora(name, path)
                self.adapter_loads += 1
        await self.call(add)

    async def remove_lora(self, name: str) -> None:
        """Forgets an adapter now, or as soon as the requests using it have finished."""
        def remove() -> None:
            if not self.engine.remove_lora(name) and self.engine.has_lora(name):
                self._pending_removals.add(name)
        await self.call(remove)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       lora: str | None = None, cache_salt: str | None = None,
                       interval_s: float | None = 0.0) -> AsyncIterator[StepOutput]:
        """Streams token deltas until the request finishes; closing the iterator aborts it.

        ``interval_s`` batches deltas for consumers that pay per message (a hop between processes): after a
        delta is handed over, the next waits until that much time has passed, folding in what arrives
        meanwhile. The first delta (time to first token) and the last are never held; None holds everything
        between them (a caller that only wants the whole answer); 0 hands each delta over as it comes.
        """
        self._ensure_started()
        self.engine.validate(request_id, prompt_token_ids, lora, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if self.error is not None:  # the loop died after the check above: nobody would answer
                raise _dead(self.error)
            self._streams[request_id] = queue
            self._inbox_add.append((request_id, list(prompt_token_ids), params, lora, cache_salt))
        self._wake.set()
        finished = False
        loop = asyncio.get_running_loop()
        hold_until: float | None = None  # loop time until which deltas are gathered; None: hand over at once
        try:
            while not finished:
                items = [await queue.get()]
                while hold_until is not None and not _last(items[-1]):
                    if hold_until <= loop.time():
                        break
                    try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (the abort)
                        async with asyncio.timeout_at(None if hold_until == float("inf") else hold_until):
                            items.append(await queue.get())
                    except TimeoutError:
                        break
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                out = merge(items)  # type: ignore[arg-type]
                finished = out.finished
                yield out
                if interval_s is None:
                    hold_until = float("inf")
                elif interval_s > 0:
                    hold_until = loop.time() + interval_s
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox_abort.append(request_id)
        self._wake.set()

    def check_health(self) -> None:
        if self.error is not None:
            raise _dead(self.error)
        if self._thread is not None and not self._thread.is_alive() and not self._stopped:
            raise EngineDeadError("engine loop thread is not running")

    def stats(self) -> dict[str, float]:
        engine, blocks = self.engine, self.engine.block_manager
        return {"running": engine.num_running, "waiting": engine.num_waiting, "kv_cache_usage": blocks.usage,
                "free_blocks": blocks.num_free_blocks, "total_blocks": blocks.num_blocks,
                "prefix_cached_tokens": blocks.num_cached_tokens, "adapters": len(engine.lora_names()),
                "adapter_loads": self.adapter_loads, "requests_admitted": engine.num_admitted,
                "requests_aborted": engine.num_aborted}

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ----- engine thread -----
    def _deliver(self, request_id: str, item: StepOutput | BaseException) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _fail_all(self, exc: BaseException, calls: list[tuple[Callable[[], Any], asyncio.Future]]) -> None:
        """Every caller hears of the death at once: open streams and queued calls (adapter loads) alike."""
        dead = _dead(exc)
        for queue in list(self._streams.values()):
            queue.put_nowait(dead)
        for _fn, future in calls:
            _settle(future, None, dead)

    def _run_call(self, fn: Callable[[], Any], future: asyncio.Future) -> None:
        assert self._loop is not None
        try:
            result = fn()
        except Exception as exc:  # the caller's problem (bad adapter, ...), never the loop's
            self._loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, future, result, None)

    def _pending_adds(self) -> int:
        with self._lock:
            return len(self._inbox_add)

    def _gather(self) -> None:
        """The engine is idle and was woken: while requests keep coming, each within gather_s of the last, wait
        (the next pass admits them all into one step). A wake without a request (an abort, a call) waits not."""
        seen = self._pending_adds()
        if self.gather_s <= 0 or seen == 0:
            return
        for _ in range(MAX_GATHER_GAPS):
            time.sleep(self.gather_s)
            now = self._pending_adds()
            if now == seen or now >= self.engine.config.max_num_seqs or self._stopped:  # no more, or a full step
                return
            seen = now

    def _run(self) -> None:
        assert self._loop is not None
        try:
            while not self._stopped:
                with self._lock:
                    adds, self._inbox_add = self._inbox_add, []
                    aborts, self._inbox_abort = self._inbox_abort, []
                    calls, self._inbox_calls = self._inbox_calls, []
                    self._wake.clear()
                for request_id in aborts:
                    self.engine.abort_request(request_id)
                for request_id, prompt, params, lora, salt in adds:
                    if request_id in aborts:
                        continue
                    try:
                        self.engine.add_request(request_id, prompt, params, lora, salt)
                    except Exception as exc:  # one request's data (or a raced twin id): that stream, not the loop
                        failed = exc if isinstance(exc, InvalidRequestError) else RequestFailedError(str(exc))
                        self._loop.call_soon_threadsafe(self._deliver, request_id, failed)
                # Calls after adds: a request queued with its adapter's lease in hand is running before an
                # eviction queued in the same pass can remove that adapter (which then waits for it).
                for fn, future in calls:
                    self._run_call(fn, future)
                for name in list(self._pending_removals):
                    if self.engine.remove_lora(name):
                        self._pending_removals.discard(name)
                if not self.engine.has_unfinished():
                    if self._wake.wait(timeout=1.0):
                        self._gather()
                    continue
                for out in self.engine.step():
                    self._loop.call_soon_threadsafe(self._deliver, out.request_id,
                                                    out if out.error is None else out.error)
        except BaseException as exc:  # a fault of the shared step: loud, and every caller hears at once
            with self._lock:
                self.error = exc
                calls, self._inbox_calls = self._inbox_calls, []
            self._loop.call_soon_threadsafe(self._fail_all, exc, calls)


def _last(item: StepOutput | BaseException) -> bool:
    """Whether nothing follows this item on a request's queue."""
    return isinstance(item, BaseException) or item.finished


def _dead(error: BaseException | None) -> EngineDeadError:
    return EngineDeadError(f"engine loop died: {error!r}")


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
