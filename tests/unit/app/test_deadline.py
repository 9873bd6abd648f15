"""End-to-end deadlines: work past the limit is cancelled (so the engine request is aborted)."""
from __future__ import annotations

import asyncio

import pytest

from llmaas.app.deadline import Deadline
from llmaas.app.errors import RequestTimeout


def test_work_within_the_deadline_returns_its_value():
    async def go():
        return await Deadline.start(1.0).run(asyncio.sleep(0.01, result="done"))

    assert asyncio.run(go()) == "done"


def test_work_past_the_deadline_is_cancelled_and_reported():
    cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def go():
        with pytest.raises(RequestTimeout) as err:
            await Deadline.start(0.05).run(slow())
        assert err.value.status_code == 408 and err.value.code == "request_timeout"
        assert cancelled.is_set()

    asyncio.run(go())


def test_stream_is_cut_at_the_deadline_and_its_source_closed():
    closed = []

    async def tokens():
        try:
            for i in range(1000):
                await asyncio.sleep(0.01)
                yield i
        finally:
            closed.append(True)

    async def go():
        got = []
        with pytest.raises(RequestTimeout):
            async for t in Deadline.start(0.2).stream(tokens()):
                got.append(t)
        return got

    got = asyncio.run(go())
    assert 3 < len(got) < 1000 and got == list(range(len(got)))
    assert closed == [True]


def test_stream_that_ends_in_time_and_no_limit():
    async def three():
        for i in range(3):
            yield i

    async def go(timeout):
        return [t async for t in Deadline.start(timeout).stream(three())]

    assert asyncio.run(go(5.0)) == [0, 1, 2]
    assert asyncio.run(go(None)) == [0, 1, 2]
