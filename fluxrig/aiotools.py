"""Small asyncio helpers shared by the Rack's background workers."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["cancel_and_wait", "close_quietly"]

log = logging.getLogger("fluxrig.aiotools")


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has finished; its exception, if any, was
    already logged by the task itself, so it is not raised again here."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass


async def close_quietly(nc, timeout: float) -> bool:
    """Close a nats-py connection without ever hanging: nats-py's close() can stay blocked
    behind a reconnect loop (e.g. credentials just revoked) and does not always honour
    cancellation, so asyncio.wait_for would wait for it forever. The close keeps running in
    the background if it overruns. True when it finished in time."""
    task = asyncio.ensure_future(nc.close())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.debug("bus connection close still pending after %.1fs; left to finish in the background", timeout)
        return False
    if not task.cancelled() and task.exception() is not None:
        log.debug("bus connection close failed: %s", task.exception())
    return True
