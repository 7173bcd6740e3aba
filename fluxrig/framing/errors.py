"""Typed errors of the framer family (shared by the pure and the compiled framers).

They live once, in plain Python, so `fluxrig.framing.core_py` and its compiled twin
`fluxrig.framing.core_c` raise the very same classes.

Two kinds of ingress error, and what a gear does with each:

* **Fatal** (the stream cannot be resynchronised): `fluxrig.errors.FrameTooLarge` and
  `BadLengthPrefix` (and any other plain `FramingError`). The framer keeps raising the same
  error until `reset()`; the gear closes the connection (or reopens the serial port).
* **Recoverable** (`BadFrame` and its subclasses `CrcMismatch`, `BadEscape`): one frame was
  malformed and has been dropped; the framer already resynchronised and keeps every later
  byte. The gear sends the error to its `error` port and carries on.

Every ingress error carries `frames`: the good frames completed *before* the error in the same
`feed`/`poll` call, so the gear can emit them first and nothing valid is lost. Offsets are
stream offsets: bytes since the framer was created or last reset.

Egress (`encode`) errors are `LocalProtocolError`s: we were asked to write something the
framing cannot carry.
"""

from __future__ import annotations

from fluxrig.errors import FramingError, LocalProtocolError

__all__ = [
    "BadLengthPrefix",
    "BadFrame",
    "CrcMismatch",
    "BadEscape",
    "EncodeError",
    "PayloadTooLarge",
]


class BadLengthPrefix(FramingError):
    """A length prefix could not be read (non-digit ASCII, bad BCD nibble, a length that is
    zero or negative once the prefix's own bytes are taken off). Fatal for the stream.

    Fields: `offset` (stream offset of the prefix), `prefix` (its raw bytes), `kind`
    (binary, ascii4, bcd2, vap), `reason`, `frames` (good frames before it in the same call).
    """

    def __init__(self, reason: str, offset: int, prefix: bytes, kind: str, frames: list | None = None):
        self.reason = reason
        self.prefix = prefix
        self.kind = kind
        self.frames = frames if frames is not None else []
        super().__init__(f"bad {kind} length prefix {prefix.hex(' ')}: {reason}", offset)


class BadFrame(FramingError):
    """One frame was malformed and dropped; the framer resynchronised and keeps later bytes.

    Fields: `offset` (stream offset of the frame), `frame` (the dropped raw bytes), `reason`,
    `frames` (good frames completed before it in the same call).
    """

    recoverable = True

    def __init__(self, reason: str, offset: int, frame: bytes, frames: list | None = None):
        self.reason = reason
        self.frame = frame
        self.frames = frames if frames is not None else []
        super().__init__(f"bad frame of {len(frame)} bytes dropped: {reason}", offset)


class CrcMismatch(BadFrame):
    """A Modbus RTU frame failed its CRC-16 check; `expected` is the CRC computed over the
    frame, `actual` the CRC it carried (both as integers, 0..0xFFFF)."""

    def __init__(self, expected: int, actual: int, offset: int, frame: bytes, frames: list | None = None):
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"CRC-16/MODBUS mismatch: computed 0x{expected:04X}, frame carries 0x{actual:04X}",
            offset,
            frame,
            frames,
        )


class BadEscape(BadFrame):
    """A SLIP frame held an ESC (0xDB) not followed by ESC_END (0xDC) or ESC_ESC (0xDD)."""


class EncodeError(LocalProtocolError):
    """`encode` was given a payload the framing cannot carry (empty where empty frames are not
    allowed, containing the delimiter, wrong size for fixed framing, ...).

    Fields: `size` (payload bytes), `limit` (the bound it broke, when there is one), `reason`.
    """

    def __init__(self, reason: str, size: int, limit: int | None = None):
        self.reason = reason
        self.size = size
        self.limit = limit
        super().__init__(f"cannot frame a payload of {size} bytes: {reason}")


class PayloadTooLarge(EncodeError):
    """The payload is longer than `max_frame_bytes` or than the length prefix can express."""
