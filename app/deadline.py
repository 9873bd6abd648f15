"""End-to-end request deadlines: one clock from admission to the last token.

Cancelling the awaited work on expiry is what frees the engine: the cancellation
reaches the backend generator, which cancels the model-stage call, which aborts the
engine request and returns its KV blocks.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from llmaas.app.errors import RequestTimeout

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Deadline:
    timeout_s: float | None  # None: no limit
    expires: float           # time.monotonic() value

    @classmethod
    def start(cls, timeout_s: float | None) -> Deadline:
        return cls(timeout_s, time.monotonic() + (timeout_s if timeout_s is not None else 0.0))

    def remaining(self) -> float | None:
        return None if self.timeout_s is None else self.expires - time.monotonic()

    def _expired(self) -> RequestTimeout:
        return RequestTimeout(f"request did not finish within {self.timeout_s:g} s (the server's request timeout)",
                              code="request_timeout")

    async def run(self, work: Awaitable[T]) -> T:
        """Awaits ``work``; past the deadline it is cancelled and RequestTimeout raised."""
        left = self.remaining()
        if left is None:
            return await work
        try:
            return await asyncio.wait_for(work, max(left, 0.0))
        except TimeoutError:
            raise self._expired() from None

    async def stream(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Yields ``items`` until they end or the deadline passes (then RequestTimeout; ``items`` is closed)."""
        try:
            while True:
                try:
                    item = await self.run(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await items.aclose()
