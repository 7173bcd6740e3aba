"""Time-based serial framers: a frame ends after the line falls silent (sans-IO).

Job: cut a serial byte stream at idle gaps (`IdleGapFramer`) and, for Modbus RTU, check and
strip the CRC-16 (`ModbusRtuFramer`). Pure Python: serial lines carry at most ~11 KB/s, far
below what needs a compiled twin.

Sans-IO timing contract: the caller passes the time; nothing here reads a clock or sleeps.
  feed(data, now) -> frames   `now` is when `data` was read (a monotonic clock, seconds). If the
                              line was silent for at least `gap` before `data`, the bytes held
                              so far form a frame, returned now; `data` then starts the next one.
  poll(now) -> frames         the pending frame, once `now` is at least `gap` after its last byte.
  deadline() -> float | None  when to call poll (last byte time + gap), None if nothing pending.
  flush() -> frames           end of stream / port closed: the pending bytes as a frame.
  encode(payload) -> bytes    the bytes to write; the writer keeps `gap` of silence between
                              frames (that silence *is* the framing).
Limits: `max_frame_bytes` (Modbus: MODBUS_MAX_ADU = 256); over it FrameTooLarge, fatal until
reset(). A Modbus frame with a bad CRC raises CrcMismatch (recoverable, fields expected /
actual / frame / offset / frames); bytes fed with it are kept, so later frames are not lost.
Known limit: bursts delivered in one read (USB adapters buffer 1-16 ms) carry no gap, so two
frames read together stay one; `gap` can be raised (config `idle_gap_ms`) to match the adapter.
"""

from __future__ import annotations

from fluxrig.errors import FrameTooLarge
from fluxrig.framing.core_py import DEFAULT_MAX_FRAME_BYTES
from fluxrig.framing.errors import BadFrame, CrcMismatch, EncodeError, PayloadTooLarge

__all__ = [
    "MODBUS_MAX_ADU",
    "MODBUS_MIN_ADU",
    "MODBUS_FIXED_GAP_BAUD",
    "MODBUS_FIXED_GAP",
    "MODBUS_GAP_CHARS",
    "char_time",
    "modbus_gap",
    "crc16_modbus",
    "IdleGapFramer",
    "ModbusRtuFramer",
]

#: Largest Modbus RTU ADU: address + PDU (253) + CRC (2) = 256 bytes.
MODBUS_MAX_ADU = 256
#: Smallest: address + function code + CRC.
MODBUS_MIN_ADU = 4
#: Above this baud rate the Modbus spec fixes t3.5 at 1.75 ms instead of 3.5 character times.
MODBUS_FIXED_GAP_BAUD = 19200
MODBUS_FIXED_GAP = 0.00175
#: Modbus t3.5: the silence that ends a frame, in character times.
MODBUS_GAP_CHARS = 3.5

_PARITY_BITS = {"N": 0, "E": 1, "O": 1, "M": 1, "S": 1}


def char_time(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Seconds one character takes on the line: (1 start + data + parity + stop bits) / baud.
    `parity` is a pyserial letter (N, E, O, M, S); `stopbits` 1, 1.5 or 2."""
    if baudrate <= 0:
        raise ValueError(f"baudrate must be > 0, got {baudrate}")
    try:
        parity_bits = _PARITY_BITS[str(parity).upper()[:1]]
    except KeyError:
        raise ValueError(f"parity must be one of N, E, O, M, S, got {parity!r}") from None
    return (1 + bytesize + parity_bits + stopbits) / baudrate


def modbus_gap(baudrate: int, bytesize: int = 8, parity: str = "E", stopbits: float = 1) -> float:
    """Modbus RTU t3.5 in seconds: 3.5 character times, or the fixed 1.75 ms the spec
    prescribes above 19200 baud (where per-character timers are impractical)."""
    if baudrate > MODBUS_FIXED_GAP_BAUD:
        return MODBUS_FIXED_GAP
    return MODBUS_GAP_CHARS * char_time(baudrate, bytesize, parity, stopbits)


def _crc_table() -> tuple:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS: reflected poly 0xA001, init 0xFFFF, no final xor. On the wire the low
    byte goes first: `crc.to_bytes(2, "little")`."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


class IdleGapFramer:
    """A frame is whatever arrived between two silences of at least `gap` seconds."""

    #: Adapters tell time-based framers (feed(data, now), poll, deadline) from stream framers
    #: (feed(data)) with `getattr(framer, "timed", False)`.
    timed = True

    def __init__(self, gap: float, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        if not gap > 0:
            raise ValueError(f"idle gap must be > 0 seconds, got {gap!r}")
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be >= 1, got {max_frame_bytes!r}")
        self.gap = float(gap)
        self.max_frame_bytes = int(max_frame_bytes)
        self._buf = bytearray()
        self._last = 0.0
        self._base = 0
        self._error = None

    @classmethod
    def for_line(
        cls,
        baudrate: int,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        gap_chars: float = 3.5,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ):
        """A framer whose gap is `gap_chars` character times at these line settings."""
        return cls(gap_chars * char_time(baudrate, bytesize, parity, stopbits), max_frame_bytes)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf = bytearray()
        self._last = 0.0
        self._base = 0
        self._error = None

    def deadline(self):
        """Monotonic time at which `poll` will complete the pending frame, or None."""
        return self._last + self.gap if self._buf else None

    def feed(self, data, now: float) -> list:
        if self._error is not None:
            raise self._rearm()
        pending = None
        if self._buf and now - self._last >= self.gap:
            pending = self._take()
        if data:
            self._buf += data
            self._last = now
            if len(self._buf) > self.max_frame_bytes:
                frames = []
                if pending is not None:
                    try:
                        frames = self._finish(*pending)
                    except BadFrame:
                        pass  # the fatal error below is what the gear must act on
                exc = FrameTooLarge(len(self._buf), self.max_frame_bytes, self._base)
                exc.frames = frames
                self._error = exc
                raise exc
        if pending is None:
            return []
        return self._finish(*pending)

    def poll(self, now: float) -> list:
        if self._error is not None:
            raise self._rearm()
        if self._buf and now - self._last >= self.gap:
            return self._finish(*self._take())
        return []

    def flush(self) -> list:
        if self._error is not None:
            raise self._rearm()
        if not self._buf:
            return []
        return self._finish(*self._take())

    def encode(self, payload) -> bytes:
        data = bytes(payload)
        if not data:
            raise EncodeError("an empty frame is no frame on an idle-gap line", 0)
        if len(data) > self.max_frame_bytes:
            raise PayloadTooLarge("longer than max_frame_bytes", len(data), self.max_frame_bytes)
        return data

    def _take(self):
        frame = bytes(self._buf)
        offset = self._base
        self._buf = bytearray()
        self._base += len(frame)
        return frame, offset

    def _finish(self, frame: bytes, offset: int) -> list:
        # Hook for subclasses that check a frame (ModbusRtuFramer).
        return [frame]

    def _rearm(self):
        exc = self._error
        exc.frames = []
        return exc


class ModbusRtuFramer(IdleGapFramer):
    """Modbus RTU: idle-gap framing at t3.5 plus a CRC-16/MODBUS check.

    Frames are returned without their CRC (address + PDU) unless `keep_crc`; `encode` appends
    the CRC, low byte first. `gap` overrides the computed t3.5 (seconds).
    Raises CrcMismatch or BadFrame (shorter than 4 bytes), both recoverable.
    """

    def __init__(
        self,
        baudrate: int,
        bytesize: int = 8,
        parity: str = "E",
        stopbits: float = 1,
        keep_crc: bool = False,
        max_frame_bytes: int = MODBUS_MAX_ADU,
        gap=None,
    ):
        if gap is None:
            gap = modbus_gap(baudrate, bytesize, parity, stopbits)
        super().__init__(gap, max_frame_bytes)
        self.baudrate = baudrate
        self.keep_crc = bool(keep_crc)

    def _finish(self, frame: bytes, offset: int) -> list:
        if len(frame) < MODBUS_MIN_ADU:
            raise BadFrame(f"Modbus RTU frame shorter than {MODBUS_MIN_ADU} bytes", offset, frame)
        expected = crc16_modbus(frame[:-2])
        actual = frame[-2] | (frame[-1] << 8)
        if expected != actual:
            raise CrcMismatch(expected, actual, offset, frame)
        return [frame if self.keep_crc else frame[:-2]]

    def encode(self, payload) -> bytes:
        data = bytes(payload)
        if len(data) < MODBUS_MIN_ADU - 2:
            raise EncodeError("a Modbus RTU frame needs at least an address and a function code", len(data))
        if len(data) + 2 > self.max_frame_bytes:
            raise PayloadTooLarge("address + PDU + CRC exceed max_frame_bytes", len(data) + 2, self.max_frame_bytes)
        return data + crc16_modbus(data).to_bytes(2, "little")
