"""What may be asked of a running Rack: one typed request each, posted on one queue.

Signal handlers, `fluxrig reload`, and the agent (for the Mixer) never call into the Rack: they
post one of these on its `RequestQueue`, and `Rack.run` is one loop that `match`es them, one at
a time. That single consumer is what serialises reloads, kills and revives (no shared lock).

A request whose sender needs the outcome carries an `asyncio.Future`: the Rack sets its result
(or the exception that refused it) once handled. A sender must bound its wait: a Rack that is
stopping drops what it has not handled and cancels those futures.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from .wire.vocab import LogLevel

__all__ = [
    "Stop",
    "ReloadFile",
    "ApplyScenario",
    "ControlCommand",
    "SetLogLevel",
    "Shutdown",
    "RackRequest",
    "RequestQueue",
    "DEFAULT_QUEUE_SIZE",
]

log = logging.getLogger("fluxrig.rack")

#: Far more than a Mixer sends between two loop turns; a full queue makes the agent wait
#: (backpressure on its subscription), and a signal that finds it full is logged, not lost
#: silently.
DEFAULT_QUEUE_SIZE = 256


def _future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


@dataclass(frozen=True, slots=True)
class Stop:
    """SIGTERM/SIGINT: drain within rack.drain_timeout, then exit 0."""

    signal: str = ""


@dataclass(frozen=True, slots=True)
class ReloadFile:
    """SIGHUP or `fluxrig reload`: re-read the scenario file and shadow-swap it in."""


@dataclass(frozen=True, slots=True)
class ApplyScenario:
    """Run the scenario projection a verified passport carries. `outcome` gets None once
    applied, or the exception that refused it (its text is the `rejected` reason)."""

    doc: dict
    version: str
    rack_name: str
    outcome: asyncio.Future = field(default_factory=_future)


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """A kill-switch verb with its raw signed command; verified by the Rack's KillSwitch against
    `pins` for the Rack `rack_id` (what the agent knew when the command arrived). `outcome`
    gets the kill switch's outcome dict."""

    verb: str
    data: bytes
    pins: tuple[bytes, ...]
    rack_id: str | None
    outcome: asyncio.Future = field(default_factory=_future)


@dataclass(frozen=True, slots=True)
class SetLogLevel:
    level: LogLevel


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The Mixer asked this Rack to stop (same drain as Stop)."""

    reason: str = ""


RackRequest = Stop | ReloadFile | ApplyScenario | ControlCommand | SetLogLevel | Shutdown


class RequestQueue:
    """The Rack's one inbox. `post` from coroutines (waits while full); `post_nowait` from
    signal handlers (logs and drops when full: the operator can send the signal again)."""

    __slots__ = ("_queue",)

    def __init__(self, maxsize: int = DEFAULT_QUEUE_SIZE):
        self._queue: asyncio.Queue[RackRequest] = asyncio.Queue(maxsize)

    async def post(self, request: RackRequest) -> None:
        await self._queue.put(request)

    def post_nowait(self, request: RackRequest) -> bool:
        try:
            self._queue.put_nowait(request)
            return True
        except asyncio.QueueFull:
            log.error("request %s dropped: the Rack's request queue is full", type(request).__name__)
            return False

    async def get(self) -> RackRequest:
        return await self._queue.get()

    def get_nowait(self) -> RackRequest | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def cancel_pending(self) -> int:
        """Drop what was never handled (the Rack is stopping); their senders see CancelledError."""
        n = 0
        while (request := self.get_nowait()) is not None:
            outcome = getattr(request, "outcome", None)
            if outcome is not None and not outcome.done():
                outcome.cancel()
            n += 1
        return n
