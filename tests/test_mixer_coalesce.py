"""coalesce.Coalesced: concurrent callers share runs, each sees a run that began after its call."""

from __future__ import annotations

import asyncio

import pytest
from fluxrig_mixer.coalesce import Coalesced


async def test_fifty_concurrent_callers_cost_two_runs_and_each_sees_its_change():
    state = {"value": 0}
    seen_by_run = []

    async def job():
        snapshot = state["value"]
        await asyncio.sleep(0.02)  # a reload: slow next to the callers
        seen_by_run.append(snapshot)
        return snapshot

    c = Coalesced(job)

    async def caller(i):
        state["value"] = max(state["value"], i)  # the change this caller needs applied
        return i, await c()

    results = await asyncio.gather(*(caller(i) for i in range(1, 51)))
    assert c.runs <= 2, c.runs
    assert all(applied >= i for i, applied in results), results  # no caller got a run older than its change


async def test_a_caller_arriving_during_a_run_waits_for_the_next():
    started = asyncio.Event()
    release = asyncio.Event()
    count = {"n": 0}

    async def job():
        count["n"] += 1
        started.set()
        await release.wait()
        return count["n"]

    c = Coalesced(job)
    first = asyncio.ensure_future(c())
    await started.wait()
    second = asyncio.ensure_future(c())  # the first run began before this call
    release.set()
    assert await first == 1 and await second == 2


async def test_an_error_reaches_every_caller_of_that_run_and_the_next_run_is_fresh():
    calls = {"n": 0}

    async def job():
        calls["n"] += 1
        await asyncio.sleep(0.01)
        if calls["n"] == 1:
            raise OSError("reload failed")
        return "ok"

    c = Coalesced(job)
    results = await asyncio.gather(c(), c(), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    assert await c() == "ok"


async def test_a_cancelled_caller_does_not_cancel_the_run():
    done = asyncio.Event()

    async def job():
        await asyncio.sleep(0.02)
        done.set()
        return 1

    c = Coalesced(job)
    waiter = asyncio.ensure_future(c())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(done.wait(), 1)
