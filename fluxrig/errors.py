"""The one error tree of the `fluxrig` distribution.

Every error carries structured fields (what, where) and a message that says what to do.
Protocol errors say whose fault it was: `LocalProtocolError` (we were asked to produce
something invalid) versus `RemoteProtocolError` (a peer sent something invalid).
"""

from __future__ import annotations

__all__ = [
    "FluxError",
    "ConfigError",
    "ScenarioError",
    "ScenarioProblem",
    "MessageError",
    "GearError",
    "LaneFull",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameTooLarge",
    "FramingError",
    "NotBuiltYet",
]


class FluxError(Exception):
    """Base of every error raised by fluxrig."""


class ConfigError(FluxError):
    """A fluxrig.toml key or value is wrong; `key` names it (dotted, e.g. `rack.drain_timeout`)."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class ScenarioProblem:
    """One problem found while validating a scenario: where (dotted location) and what."""

    __slots__ = ("location", "message")

    def __init__(self, location: str, message: str):
        self.location = location
        self.message = message

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"

    def __repr__(self) -> str:
        return f"ScenarioProblem({self.location!r}, {self.message!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ScenarioProblem) and (self.location, self.message) == (
            other.location,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.location, self.message))


class ScenarioError(FluxError):
    """A scenario failed to load or validate; `problems` lists every problem found at once."""

    def __init__(self, problems: list[ScenarioProblem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"scenario {source} is invalid" if source else "scenario is invalid"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head} ({len(self.problems)} problem(s)):\n{lines}")


class MessageError(FluxError):
    """A FluxMsg broke a limit or a rule (hops, size, UTF-8 metadata, dotted path)."""


class GearError(FluxError):
    """A gear could not process a message; `reason` becomes `error.reason` on the error port."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LaneFull(FluxError):
    """A hot-lane queue stayed full for longer than `rack.lane_send_timeout`."""


class ProtocolError(FluxError):
    """Bytes that break a wire protocol; `offset` is the byte offset when known."""

    def __init__(self, message: str, offset: int | None = None):
        self.offset = offset
        super().__init__(f"{message} (at byte offset {offset})" if offset is not None else message)


class LocalProtocolError(ProtocolError):
    """We were asked to produce bytes the protocol does not allow (our side's fault)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent bytes the protocol does not allow (the peer's fault)."""


class FramingError(RemoteProtocolError):
    """A byte stream could not be split into frames (bad length prefix, bad CRC, ...)."""


class FrameTooLarge(FramingError):
    """A frame exceeded its configured limit; `limit` and `size` say by how much."""

    def __init__(self, size: int, limit: int, offset: int | None = None):
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds max_frame_bytes={limit}", offset)


class NotBuiltYet(FluxError):
    """A feature that is declared but not built yet; the message names it."""
