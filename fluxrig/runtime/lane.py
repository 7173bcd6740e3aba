"""Hot-lane wiring inside one Rack: the receiving half, fused direct calls and bounded queues.

An `OutPort` (gear.py) sends each message to its targets, each of the `HotTarget` shape
declared there. Inside the Rack a target is either

* a `DirectTarget`: the receiving gear's `process` is awaited in the sender's call chain.
  Used for 1:1 joints (one wire out of the port, one wire into the input) when
  `rack.fuse_sync_chains` is on. Backpressure is immediate: the sender waits for the chain.
* a `Lane`: a bounded queue (`rack.lane_queue_size`) with one consumer task, for fan-in and
  fan-out joints. A full queue blocks the sender for up to `rack.lane_send_timeout`, then the
  sender gets `LaneFull`; this is what closes a TCP window when a consumer is slow. Order is
  kept per lane.

`deliver` is the single place where a message enters a gear: it counts `messages_in`,
turns a `GearError` into the error-port convention and any other exception into
`error.reason=internal`, so one bad message never kills a gear.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import GearError, LaneFull, MessageError
from ..msg import FluxMsg
from .gear import Gear

__all__ = ["DirectTarget", "Lane", "deliver"]

log = logging.getLogger("fluxrig.lane")


async def deliver(gear: Gear, port: str, msg: FluxMsg) -> None:
    """Hand `msg` to `gear` on input `port`, mapping every failure to the error convention."""
    gear.counters.messages_in += 1
    try:
        await gear.process(port, msg)
    except GearError as exc:
        await gear.emit_error(msg, exc.reason, exc.detail)
    except (LaneFull, MessageError) as exc:
        await gear.emit_error(msg, type(exc).__name__.lower(), str(exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug in a gear: log it with the stack, keep the gear alive
        log.exception("gear %s failed on a message from port %s", gear.name, port)
        await gear.emit_error(msg, "internal", f"{type(exc).__name__}: {exc}")


class DirectTarget:
    """A fused 1:1 joint: the receiver runs inside the sender's await."""

    __slots__ = ("gear", "port")
    batches = False

    def __init__(self, gear: Gear, port: str):
        self.gear = gear
        self.port = port

    @property
    def key(self) -> tuple:
        return (self.gear.name, self.port)

    def start(self) -> None:
        return None

    async def put(self, msg: FluxMsg) -> None:
        await deliver(self.gear, self.port, msg)

    async def put_many(self, msgs: list[FluxMsg]) -> None:
        gear, port = self.gear, self.port
        for msg in msgs:
            await deliver(gear, port, msg)

    def depth(self) -> int:
        return 0

    async def join(self) -> None:
        return None

    def close(self) -> None:
        return None


class Lane:
    """A bounded queue in front of one input port, with its own consumer task."""

    __slots__ = ("gear", "port", "queue", "send_timeout", "task", "max_depth")
    batches = False

    def __init__(self, gear: Gear, port: str, capacity: int, send_timeout: float):
        self.gear = gear
        self.port = port
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, capacity))
        self.send_timeout = send_timeout
        self.task: asyncio.Task | None = None
        self.max_depth = 0

    @property
    def key(self) -> tuple:
        return (self.gear.name, self.port)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(
                self._consume(), name=f"lane:{self.gear.name}.{self.port}"
            )

    async def put(self, msg: FluxMsg) -> None:
        q = self.queue
        try:
            q.put_nowait(msg)
        except asyncio.QueueFull:
            try:
                await asyncio.wait_for(q.put(msg), self.send_timeout)
            except TimeoutError:
                raise LaneFull(
                    f"lane into {self.gear.name}.{self.port} stayed full for {self.send_timeout:g}s "
                    f"({q.maxsize} queued); the consumer is too slow"
                ) from None
        depth = q.qsize()
        if depth > self.max_depth:
            self.max_depth = depth

    async def put_many(self, msgs: list[FluxMsg]) -> None:
        for msg in msgs:
            await self.put(msg)

    async def _consume(self) -> None:
        q = self.queue
        gear, port = self.gear, self.port
        while True:
            msg = await q.get()
            try:
                await deliver(gear, port, msg)
            finally:
                q.task_done()

    def depth(self) -> int:
        return self.queue.qsize()

    async def join(self) -> None:
        """Wait until everything queued has been processed (quiesce)."""
        await self.queue.join()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
