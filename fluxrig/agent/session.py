"""The Snake session as its users see it: the narrow contract lanes and telemetry depend on.

`RackAgent` (agent.py) owns the NATS connection, enrollment and heartbeats and implements
`SnakeSession`. The guaranteed lane (lanes.py) and the WAL pump (publisher.py) take a
`SnakeSession` and nothing else: they never reach into the agent, its nats-py client or its
passport, so their unit tests run against a small in-memory session (tests/fake_session.py).

State (`SessionState`):

    down     no bus connection (never connected, lost, or closed)
    waiting  connected, but the passport does not allow traffic yet (pending, suspended)
    usable   connected with a passport that allows telemetry and guaranteed traffic

`generation` grows by one at every new bus connection: a pull subscription bound under an
older generation is dead and must be bound again.

Errors. `publish` raises `SessionUnavailable` when the session is not usable (the caller keeps
its records in its WAL and waits with `wait_usable`), and whatever the bus raises when a publish
is not acknowledged (timeout, no responders, connection lost): the caller treats both the same.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from ..errors import FluxError

__all__ = ["SessionState", "SessionUnavailable", "PullSubscription", "SnakeSession"]


class SessionState(StrEnum):
    DOWN = "down"
    WAITING = "waiting"
    USABLE = "usable"


class SessionUnavailable(FluxError):
    """The Snake session cannot carry traffic now (`state` says why); records stay in the WAL."""

    def __init__(self, state: SessionState, what: str = "publish"):
        self.state = state
        super().__init__(f"cannot {what}: the Snake session is {state} (records wait in the WAL)")


@runtime_checkable
class PullSubscription(Protocol):
    """A bound pull consumer (nats-py's JetStream PullSubscription has this shape)."""

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[Any]: ...


@runtime_checkable
class SnakeSession(Protocol):
    """What the guaranteed lane and the WAL pump need from the Rack's bus session."""

    @property
    def state(self) -> SessionState: ...

    @property
    def rack_name(self) -> str | None:
        """This Rack's name from its passport (None before enrollment)."""
        ...

    @property
    def generation(self) -> int:
        """Bumped at every new bus connection (rebind pull subscriptions when it changes)."""
        ...

    async def wait_usable(self, timeout: float | None = None) -> bool:
        """Wait until the state is `usable`; False when `timeout` passed first."""
        ...

    async def publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> Any:
        """Publish to JetStream and return its PubAck (stored, and synced by the Snake)."""
        ...

    async def pull_subscribe(self, consumer: str, stream: str) -> PullSubscription:
        """Bind to an existing durable pull consumer on `stream`."""
        ...

    async def flush(self, timeout: float = 1.0) -> None:
        """Send what is buffered (acks) before the connection closes; never raises."""
        ...
