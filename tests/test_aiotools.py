"""Stop paths never hang (fluxrig/aiotools.py): a worker that swallows a cancel is cancelled
again, one that never ends is left behind by name, a stuck step is skipped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from fluxrig.aiotools import cancel_all_and_wait, cancel_and_wait, finish_within, next_within, wait_event


async def _stubborn(swallow: int) -> asyncio.Task:
    """A worker that ignores its first `swallow` cancels, as a loop over Python 3.11's
    asyncio.wait_for does when a cancel lands in the turn its inner future completes."""

    async def run() -> None:
        left = swallow
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if left == 0:
                    raise
                left -= 1

    task = asyncio.get_running_loop().create_task(run(), name=f"stubborn-{swallow}")
    await asyncio.sleep(0)  # inside its try: a task cancelled before its first step just ends
    return task


async def test_a_swallowed_cancel_is_repeated_after_the_grace():
    task = await _stubborn(1)
    t0 = time.monotonic()
    assert await cancel_and_wait(task, grace=0.5)
    assert task.cancelled()
    assert 0.4 < time.monotonic() - t0 < 2.0


async def test_a_task_that_never_ends_is_left_behind_by_name_after_the_grace(caplog):
    never = await _stubborn(1000)  # more cancels than the grace gives it
    quick = await _stubborn(0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fluxrig.aiotools"):
        assert not await cancel_all_and_wait([never, quick, None], grace=0.3)
    assert 0.5 < time.monotonic() - t0 < 2.0
    assert quick.cancelled() and not never.done()
    assert "stubborn-1000" in caplog.text and "stubborn-0" not in caplog.text
    while not never.done():  # the loop's own teardown must not meet it
        never.cancel()
        await asyncio.sleep(0)


async def test_a_real_wait_for_loop_stops():
    """The pattern of nats-py's KeyWatcher.updates under a busy watch: it must stop."""
    q: asyncio.Queue = asyncio.Queue()

    async def watch() -> None:
        while True:
            try:
                await asyncio.wait_for(q.get(), 0.01)
            except TimeoutError:
                pass

    async def feed() -> None:
        while True:
            q.put_nowait(1)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(watch()), asyncio.create_task(feed())]
    await asyncio.sleep(0.2)
    assert await cancel_all_and_wait(tasks, grace=3.0)


async def test_finish_within_skips_a_stuck_step_and_reports_failures(caplog):
    stuck = asyncio.Event()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fluxrig.aiotools"):
        assert not await finish_within(stuck.wait(), 0.3, "the stuck step")
    assert time.monotonic() - t0 < 1.5
    assert "the stuck step still pending" in caplog.text

    async def boom() -> None:
        raise RuntimeError("no")

    assert not await finish_within(boom(), 1.0, "a failing step")
    assert await finish_within(asyncio.sleep(0), 1.0, "a quick step")
    stuck.set()


async def test_next_within_gives_the_next_item_times_out_and_never_swallows_a_cancel():
    queue: asyncio.Queue = asyncio.Queue()

    class Items:  # shaped like nats-py's KeyWatcher: __anext__ awaits its queue
        def __aiter__(self):
            return self

        async def __anext__(self):
            return await queue.get()

    source = Items()
    with pytest.raises(TimeoutError):
        await next_within(source, 0.05)
    queue.put_nowait("a")
    assert await next_within(source, 1.0) == "a"

    async def follower():
        while True:  # what kv.follow does: a loop that only a cancel ends
            with contextlib.suppress(TimeoutError):
                await next_within(source, 3600)

    for _ in range(200):  # the cancel lands as an item arrives: wait_for would swallow some
        task = asyncio.ensure_future(follower())
        await asyncio.sleep(0)
        queue.put_nowait("x")
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert done, "a cancel was swallowed"


async def test_wait_event_answers_whether_it_was_set_and_never_swallows_a_cancel():
    event = asyncio.Event()
    assert await wait_event(event, 0.05) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 1.0) is True
    assert await wait_event(event, 0) is True  # already set: no wait at all

    async def pump():
        while True:  # what shared_audit's pump does: a loop that only a cancel ends
            await wait_event(event, 3600)
            event.clear()

    event.clear()
    for _ in range(200):  # the cancel lands as the event is set
        task = asyncio.ensure_future(pump())
        await asyncio.sleep(0)
        event.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert done, "a cancel was swallowed"
