"""The guaranteed lane's contract with the runtime (`Bus`), and an in-memory implementation.

A wire to or from a gear on another Rack, or marked `lane: guaranteed`, crosses the bus on
subject `flux.msg.<source rack>.<gear>.<port>`. The runtime asks its bus (anything of the
`Bus` shape; fluxrig.agent.lanes.JetStreamBus on a joined Rack) for

* `outbound(subject)`: a target with `async put(msg)` (returns once the message is safe:
  for the Snake, written to the Rack's lane WAL; it is then published with the dedup id
  `<flux id>-<hops>-<subject>` and forgotten only after the JetStream ack);
* `inbound(subject, consumer, gear, port)`: a source delivering what arrives on `subject` to
  `gear` on `port`, through a durable consumer named `consumer`, acknowledging each message
  after the gear has processed it.

* `hold()`: an async context manager inside which nothing is fetched. The runtime holds
  the bus for a whole swap: a new input and the old one it replaces are both registered
  until the old one retires, and a message fetched meanwhile would reach both.

Both also have `key`, `gear` (None for outbound), `start()`, `depth()`, `join()` and
`close()`, like hot-lane queues (the `Conduit` shape of gear.py), so the runtime starts,
drains and reuses them the same way across reloads. `MemoryBus` keeps the whole contract
inside one process (several Runtimes standing for several Racks); messages are CBOR
round-tripped as on the wire.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Protocol

from ..msg import FluxMsg
from .gear import Conduit, Gear, HotTarget
from .lane import Lane

__all__ = ["Bus", "MemoryBus", "OutboundTarget", "dedup_id"]


class Bus(Protocol):
    """What the runtime needs from the guaranteed lane (see the module docstring)."""

    def outbound(self, subject: str) -> HotTarget: ...

    def inbound(self, subject: str, consumer: str, gear: Gear, port: str, shared: str | None = None) -> Conduit: ...

    def hold(self) -> contextlib.AbstractAsyncContextManager: ...


def dedup_id(msg: FluxMsg, subject: str) -> str:
    """The JetStream Nats-Msg-Id of a message on a subject (the Go original's form)."""
    return f"{msg.id.hex()}-{len(msg.path)}-{subject}"


class OutboundTarget:
    """Base of every bus's outbound target: the lane-like surface the runtime drives (start,
    depth, join, close) is empty because a message handed to `put` has already left the Rack's
    hands; subclasses implement `put` (and `put_many` when a batch can be made safe at once)."""

    gear = None
    batches = False  # a subclass whose put_many makes a batch safe at once says True

    def __init__(self, bus, subject: str):
        self.bus = bus
        self.subject = subject
        self.key = ("bus-out", subject)

    def start(self) -> None:
        return None

    async def put_many(self, msgs: list[FluxMsg]) -> None:
        for msg in msgs:
            await self.put(msg)

    def depth(self) -> int:
        return 0

    async def join(self) -> None:
        return None

    def close(self) -> None:
        return None


class _MemoryOutbound(OutboundTarget):
    def __init__(self, bus: MemoryBus, subject: str):
        super().__init__(bus, subject)
        self.published = 0

    async def put(self, msg: FluxMsg) -> None:
        wire = msg.to_cbor()
        self.published += 1
        for source in list(self.bus.sources[self.subject]):
            await source.lane.put(FluxMsg.from_cbor(wire))


class _MemoryInbound:
    def __init__(self, bus: MemoryBus, subject: str, consumer: str, gear: Gear, port: str):
        self.bus = bus
        self.subject = subject
        self.consumer = consumer
        self.gear = gear
        self.port = port
        self.key = ("bus-in", consumer)
        self.lane = Lane(gear, port, 1024, 5.0)

    def start(self) -> None:
        self.lane.start()
        if self not in self.bus.sources[self.subject]:
            self.bus.sources[self.subject].append(self)

    def depth(self) -> int:
        return self.lane.depth()

    async def join(self) -> None:
        await self.lane.join()

    def close(self) -> None:
        if self in self.bus.sources[self.subject]:
            self.bus.sources[self.subject].remove(self)
        self.lane.close()


class MemoryBus:
    """Subjects to in-process consumers; what is published with no consumer is dropped."""

    def __init__(self):
        self.sources: dict[str, list[_MemoryInbound]] = defaultdict(list)
        self.holds = 0

    def outbound(self, subject: str) -> _MemoryOutbound:
        return _MemoryOutbound(self, subject)

    def inbound(self, subject: str, consumer: str, gear: Gear, port: str, shared: str | None = None) -> _MemoryInbound:
        return _MemoryInbound(self, subject, consumer, gear, port)  # one process: nothing to share

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[MemoryBus]:
        """Nothing to pause: delivery is synchronous to `put` (counted for tests)."""
        self.holds += 1
        try:
            yield self
        finally:
            self.holds -= 1
