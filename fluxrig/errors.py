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
    "PassportError",
    "PassportMalformed",
    "PassportSignatureInvalid",
    "PassportPinMismatch",
    "PassportExpired",
    "PassportStale",
    "KeyFileError",
    "EnrollmentDenied",
    "MixerApiError",
    "HealthcheckFailed",
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


# --- Passports, enrollment and the Mixer API client (owner: Mixer control plane) ---------


class PassportError(FluxError):
    """A passport could not be trusted; `reason` is a short machine-readable word
    (malformed, signature, pin, expired, rack) and `path` the file it came from, if any."""

    reason = "invalid"

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class PassportMalformed(PassportError):
    """The bytes are not a passport envelope `{payload, signature}` with a well-formed payload;
    `key` names the offending payload key when one is to blame."""

    reason = "malformed"

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key else message, path)


class PassportSignatureInvalid(PassportError):
    """The Ed25519 signature does not verify against the key it names (tampered or forged)."""

    reason = "signature"


class PassportPinMismatch(PassportError):
    """The passport is signed by a Mixer key that is not pinned; `pinned` lists the pinned
    keys (hex) and `presented` the key that signed. Delete the pin file only if the Mixer key
    was rotated on purpose."""

    reason = "pin"

    def __init__(self, presented: str, pinned: list[str], path: str | None = None):
        self.presented = presented
        self.pinned = list(pinned)
        super().__init__(
            f"signed by Mixer key {presented[:16]}..., which is not pinned "
            f"(pinned: {', '.join(p[:16] + '...' for p in pinned) or 'none'})",
            path,
        )


class PassportExpired(PassportError):
    """The passport's `expires_at` (unix seconds) is in the past at `now`."""

    reason = "expired"

    def __init__(self, expires_at: float, now: float, path: str | None = None):
        self.expires_at = expires_at
        self.now = now
        super().__init__(f"expired {now - expires_at:.0f}s ago (expires_at={expires_at:.0f})", path)


class PassportStale(PassportError):
    """A passport whose `serial` is not above the stored one (`current`) for the same Rack:
    passports are ordered by serial, never by their time stamps (an older one replayed)."""

    reason = "stale"

    def __init__(self, serial: int, current: int, path: str | None = None):
        self.serial = serial
        self.current = current
        super().__init__(f"serial {serial} is not newer than the stored passport's serial {current}", path)


class KeyFileError(FluxError):
    """A key file (cluster key, pin file) is missing, unreadable or not a key; `path` names it."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class EnrollmentDenied(FluxError):
    """The Mixer refused this Rack's Hello (wrong bootstrap token, removed Rack); `reason` is
    the Mixer's explanation."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"enrollment denied by the Mixer: {reason}")


class MixerApiError(FluxError):
    """A call to the Mixer control API failed; `status` is the HTTP status (0 when the Mixer
    could not be reached) and `url` the URL called."""

    def __init__(self, message: str, status: int = 0, url: str | None = None):
        self.status = status
        self.url = url
        super().__init__(message)


# --- healthcheck (fluxrig/health.py, `fluxrig healthcheck`) ---------------------------------------
class HealthcheckFailed(FluxError):
    """The Rack did not answer its health socket; `path` names the socket, `reason` says why."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
