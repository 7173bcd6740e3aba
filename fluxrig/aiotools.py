"""Small asyncio helpers shared by the Rack's and the Mixer's background workers.

A stop path must never hang: every wait here is bounded, and what overruns is logged by name
and left to finish in the background. asyncio.wait_for is not enough for that on Python 3.11:
after its timeout it cancels the awaited task and then waits for it without a bound, and it
swallows a cancellation that lands in the same loop turn as its inner future completing
(CPython gh-86296, fixed in 3.12). nats-py calls wait_for inside its KV watchers and requests,
so a worker looping over them can miss one cancel and run on: cancel_and_wait cancels it
again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable

__all__ = [
    "STOP_GRACE_S",
    "cancel_all_and_wait",
    "cancel_and_wait",
    "close_quietly",
    "finish_within",
    "next_within",
    "wait_event",
    "retrieve_outcome",
]

log = logging.getLogger("fluxrig.aiotools")

STOP_GRACE_S = 5.0  # how long a stopping worker may take to end once cancelled


async def cancel_all_and_wait(tasks: Iterable[asyncio.Future | None], grace: float = STOP_GRACE_S) -> bool:
    """Cancel background tasks and wait until they have finished. A task still running after
    `grace` seconds is cancelled once more (it swallowed the first cancel, or its clean-up is
    stuck) and given `grace` again; what still runs then is logged by name and left behind.
    Their exceptions were logged by the tasks themselves and are not raised here. True when
    every one ended."""
    tasks = [t for t in tasks if t is not None]
    for t in tasks:  # their outcome is retrieved, so asyncio does not report it as never retrieved
        t.add_done_callback(retrieve_outcome)
    pending = {t for t in tasks if not t.done()}
    for attempt in range(2):
        if not pending:
            return True
        if attempt:
            log.info("cancelling again, still running %.1fs after a cancel: %s", grace, _names(pending))
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace)
    if pending:
        log.warning("still running %.1fs after being cancelled twice, left behind: %s", 2 * grace, _names(pending))
        return False
    return True


async def cancel_and_wait(task: asyncio.Future | None, grace: float = STOP_GRACE_S) -> bool:
    """cancel_all_and_wait for one task (None is allowed and already done)."""
    return await cancel_all_and_wait([task], grace)


async def finish_within(aw: Awaitable, timeout: float, what: str) -> bool:
    """Await `aw` for at most `timeout` seconds without ever hanging past it (the overrun is
    logged with `what` and keeps running in the background). Its exception is logged, not
    raised: for stop paths, where one step failing must not keep the next from running.
    True when it finished in time and without error."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning("%s still pending after %.1fs; left to finish in the background", what, timeout)
        task.add_done_callback(retrieve_outcome)
        return False
    if task.cancelled():
        return False
    if task.exception() is not None:
        log.debug("%s failed: %s", what, task.exception())
        return False
    return True


async def close_quietly(nc, timeout: float) -> bool:
    """Close a nats-py connection without ever hanging: nats-py's close() can stay blocked
    behind a reconnect loop (e.g. credentials just revoked) and does not always honour
    cancellation. True when it finished in time."""
    return await finish_within(nc.close(), timeout, "bus connection close")


async def next_within(source, timeout: float):
    """The next item of an async iterator, or TimeoutError after `timeout` seconds. Unlike
    asyncio.wait_for (Python 3.11) it never swallows a cancellation of the caller: the item
    being fetched is dropped then, which is what a worker being stopped wants."""
    step = asyncio.ensure_future(anext(source))
    try:
        done, _ = await asyncio.wait({step}, timeout=timeout)
    finally:
        if not step.done():
            step.cancel()
    if not done:
        raise TimeoutError
    return step.result()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set, at most `timeout` seconds; True when it is. Built on
    asyncio.wait for the reason next_within is: a cancel of the caller always lands."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
    return event.is_set()


def _names(tasks) -> str:
    return ", ".join(sorted(t.get_name() if isinstance(t, asyncio.Task) else repr(t) for t in tasks))


def retrieve_outcome(fut: asyncio.Future) -> None:
    """A done-callback for a future nobody may await (a task left behind, every caller gone):
    its exception is retrieved, so asyncio does not report it as never retrieved."""
    if not fut.cancelled():
        fut.exception()
