"""Reload handover of an open serial device between two `SerialEndpoint`s (issue 18 item 3).

Job: when a reload rebuilds an `io_serial` gear on the same device with the same line settings
(`SerialEndpoint.take_over(old, wait, keep_link=True)`), the device is never closed: the old
endpoint gives its open `SerialLink` to the new one instead. This module is that move, kept
apart from the endpoint's everyday supervision; it works on the endpoint's own fields, as
the endpoint's friend.

Contract:

  hand_link(old, new, link)   called by `old.drain()`, i.e. when the old version retires after
                              the cut-over (a rolled-back swap never moves anything), between two
                              reads (synchronous). From the next byte on, `new` reads, frames,
                              writes and watches the device: the link's callbacks point at it,
                              and so does the half-read frame when the framing is unchanged
                              (`keep_ingress`; else the old framer's leftovers are flushed as at
                              a close). Same descriptor, same conn.id, no conn.up / conn.down.
                              Reading never pauses, so no byte the device sends is lost.
  follow_predecessor(new)     the start of `new`'s supervisor: wait (at most the take_over
                              `wait`) until `old` hands its link over, then watch it; or until
                              `old` released the device, then open it as usual.

Order: frames `old` read before the move are delivered by `old` first; `new`'s pump waits on
`new._pump_gate`, which `old.drain()` opens once its inbox is empty (bounded by its deadline).
Writes: `new.send` before the link arrives waits for it (at most `wait`); writes `old` still
makes (in flight in the graph it came from) go to `new`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..wire.meta import CONN_GEAR

if TYPE_CHECKING:  # pragma: no cover
    from .serial_endpoint import SerialEndpoint
    from .serial_port import SerialLink

__all__ = ["hand_link", "follow_predecessor"]


def hand_link(old: SerialEndpoint, new: SerialEndpoint, link: SerialLink) -> None:
    """Move the open `link` from `old` to `new` (see the module docstring)."""
    old._cancel_timer()
    if new._keep_ingress:
        new.ingress = old.ingress  # with its half-read frame
    else:
        old._push(old.ingress.close())  # the old framing's leftovers, as at a close
        new.ingress.reset()
    link.on_data = new._on_data
    link.on_lost = new._on_lost
    if old._executor is not None:  # a thread-mode link reads and writes in it
        own, new._executor = new._executor, old._executor
        link.executor = old._executor
        old._executor = None
        if own is not None:
            own.shutdown(wait=False)
    old.link = None
    old._handed_to = new
    old.down_reason = "handed over to the reloaded gear"
    new.link = link
    new.conn_id = old.conn_id
    new._meta = {**old._meta, CONN_GEAR: new.name}
    new._link_state = old._link_state
    new._next_write_at = old._next_write_at  # the inter-frame silence goes on across the move
    new.stats["adopted"] += 1
    new.stats["opens"] = old.stats["opens"]
    new.stats["reconnects"] = old.stats["reconnects"]
    if link.paused:  # old's backpressure: new's own applies from now on
        link.resume()
    if new.ingress.timed:
        new._arm_timer()
    old._gone.set()  # old's watch loop ends without closing the link
    new._link_ready.set()
    old.log.info("%s: reload: %s handed over open as %s (not closed)", old.name, old.settings.port, old.conn_id)


async def follow_predecessor(new: SerialEndpoint) -> None:
    """Wait for the predecessor to hand its link over (then watch it until it is lost) or to
    release the device (then return: the caller opens it)."""
    prev = new._previous
    waits = [asyncio.ensure_future(prev.released.wait())]
    if new._link_ready is not None:
        waits.append(asyncio.ensure_future(new._link_ready.wait()))
    try:
        done, _pending = await asyncio.wait(waits, timeout=new._previous_wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    new._previous = None
    if new._link_ready is not None:
        new._link_ready.set()  # a write waiting for the link stops waiting
    link = new.link
    if link is not None and not new.stopping:  # handed over: the same open, watched here
        try:
            await new._watch(link)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave the device closed for good
            new.log.exception("%s: the link to %s failed; reopening", new.name, new.settings.port)
        if not new.stopping:
            await new._sleep(new.reconnect_wait)
    elif not done:
        new.log.warning("%s: previous version still holds %s; opening anyway", new.name, new.settings.port)
