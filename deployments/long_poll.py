"""The long poll a Router keeps open on a state actor (the registry's, the access keys'): one per replica."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class LongPoll(Generic[T]):
    """``ensure()`` starts the poll on first use (concurrent first callers share it) and returns once the first
    state is applied; after that ``poll()`` is awaited in a loop, each answer applied as it comes.

    Args:
        first: fetches the current state.
        poll: returns when the state changes (or after the actor's timeout) with the state then.
        apply: takes a state; returns False when it was older than what is applied already (the poll then
            backs off a moment instead of spinning).
    """

    def __init__(self, name: str, first: Callable[[], Awaitable[T]], poll: Callable[[], Awaitable[T]],
                 apply: Callable[[T], bool]) -> None:
        self.name = name
        self.first, self.poll, self.apply = first, poll, apply
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None

    async def ensure(self) -> None:
        if self._task is None or self._task.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.get_running_loop().create_task(self._run(self._ready))
        await asyncio.shield(self._ready)

    async def _run(self, ready: asyncio.Future) -> None:
        try:
            self.apply(await self.first())
        except Exception as exc:  # the first caller sees it; the next call starts over
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while True:
            try:
                if not self.apply(await self.poll()):
                    await asyncio.sleep(1.0)
            except Exception:  # the actor restarting: try again shortly
                logger.exception("%s watch failed", self.name)
                await asyncio.sleep(0.5)
