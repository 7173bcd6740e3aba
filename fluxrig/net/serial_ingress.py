"""Serial ingress, sans-IO: a framer plus the resynchronisation a serial line needs.

Job: turn the bytes read from a serial line (with the time they were read) into frames and
faults, for `io_serial`. No I/O and no clock here: the caller passes `now` (monotonic seconds).

A TCP gear closes a connection whose framing broke; a serial line cannot be closed like that
(the device keeps talking, and reopening the port changes nothing on the wire). So after a
*fatal* framing error (FrameTooLarge, BadLengthPrefix) the framer is reset and input is
discarded until the next point where a frame can start again:

  delimiter, suffix   just after the next delimiter (the end of the oversize frame)
  delimiter, prefix   the next delimiter (which starts the next frame)
  slip                the next END byte (0xC0)
  anything else       a silence of `resync_gap` seconds (idle_gap / modbus_rtu: their own gap;
                      length prefixes and fixed sizes carry no boundary in the bytes)

A line that never falls silent (a device streaming continuously with length-prefixed frames)
therefore never resynchronises: there is no safe place to restart in such a stream.
*Recoverable* errors (BadFrame and its subclasses CrcMismatch, BadEscape) drop one frame; the
framer has already resynchronised and every later byte is kept.

Contract:
  feed(data, now) -> list   items in line order: `bytes` (a frame) or `Fault` (for the error port)
  poll(now) -> list         timed framers: the frame a silence completed
  deadline() -> float|None  when `poll` has something to do (None: nothing pending)
  close() -> list           the port closed: what the framer can still complete, and a Fault
                            for an unfinished frame that is lost
  reset()                   a fresh link: forget everything
Counters: `frames`, `faults`, `discarded` (bytes thrown away while resynchronising).
"""

from __future__ import annotations

from fluxrig.errors import FrameTooLarge, FramingError
from fluxrig.framing.config import parse_delimiter
from fluxrig.framing.errors import BadFrame, BadLengthPrefix, CrcMismatch
from fluxrig.wire.meta import ERROR_CRC_ACTUAL, ERROR_CRC_EXPECTED, ERROR_LIMIT, ERROR_OFFSET, ERROR_SIZE

__all__ = [
    "Fault",
    "Ingress",
    "REASONS",
    "FAULT_SAMPLE_BYTES",
    "RESYNC_MIN_GAP",
    "RESYNC_GAP_CHARS",
    "reason_of",
]

#: Bytes of the offending input kept in a fault's `sample` (the error message's raw).
FAULT_SAMPLE_BYTES = 64
#: Silence that ends a resynchronisation for framings without a boundary marker: the larger
#: of RESYNC_GAP_CHARS character times and RESYNC_MIN_GAP seconds (USB adapters deliver in
#: bursts up to 16 ms apart, so a shorter silence is not a real one).
RESYNC_MIN_GAP = 0.020
RESYNC_GAP_CHARS = 20

#: error.reason per error class, most specific first (looked up along the MRO).
REASONS = {
    CrcMismatch: "crc_mismatch",
    BadFrame: "bad_frame",
    FrameTooLarge: "frame_too_large",
    BadLengthPrefix: "bad_length_prefix",
    FramingError: "framing_error",
}

_GAP, _SKIP_PAST, _KEEP_FROM = 0, 1, 2


def reason_of(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        reason = REASONS.get(cls)
        if reason is not None:
            return reason
    return "framing_error"


class Fault:
    """One ingress problem for the error port: `reason` (error.reason), `detail`, `sample`
    (bytes of the bad input, at most the dropped frame), `fatal` (the framer was reset and the
    line resynchronised), `fields` (extra error.* metadata: offset, limit, size, CRCs)."""

    __slots__ = ("reason", "detail", "sample", "fatal", "fields")

    def __init__(self, reason: str, detail: str, sample: bytes = b"", fatal: bool = False, fields: dict | None = None):
        self.reason = reason
        self.detail = detail
        self.sample = sample
        self.fatal = fatal
        self.fields = fields or {}

    def __repr__(self) -> str:
        return f"Fault({self.reason!r}, {self.detail!r})"


def _fault(exc: FramingError, sample: bytes, fatal: bool) -> Fault:
    fields = {}
    if getattr(exc, "offset", None) is not None:
        fields[ERROR_OFFSET] = str(exc.offset)
    for attr, key in (("limit", ERROR_LIMIT), ("size", ERROR_SIZE)):
        if getattr(exc, attr, None) is not None:
            fields[key] = str(getattr(exc, attr))
    if isinstance(exc, CrcMismatch):
        fields[ERROR_CRC_EXPECTED] = f"{exc.expected:04X}"
        fields[ERROR_CRC_ACTUAL] = f"{exc.actual:04X}"
    detail = str(exc)
    if fatal:
        detail += "; framer reset, input discarded until the line resynchronises"
    return Fault(reason_of(exc), detail, sample, fatal, fields)


class Ingress:
    """Framer + resynchronisation for one serial gear (see the module docstring).

    `framer` comes from `make_framer(config)`; `config` is the same dict (it says where a
    frame can restart); `char_time` is one character's duration at the line settings.
    """

    def __init__(self, framer, config: dict, char_time: float, resync_gap: float | None = None):
        self.framer = framer
        self.timed = bool(getattr(framer, "timed", False))
        framing = config.get("framing", "delimiter")
        if framing == "delimiter":
            self._marker = parse_delimiter(config.get("delimiter") or "") or b"\n"
            self._kind = _KEEP_FROM if config.get("delimiter_position") == "prefix" else _SKIP_PAST
        elif framing == "slip":
            self._marker, self._kind = b"\xc0", _KEEP_FROM
        else:
            self._marker, self._kind = b"", _GAP
        if resync_gap is None:
            resync_gap = framer.gap if self.timed else max(RESYNC_MIN_GAP, RESYNC_GAP_CHARS * char_time)
        self.resync_gap = float(resync_gap)
        self.frames = 0
        self.faults = 0
        self.discarded = 0
        self._fed = 0  # bytes given to the framer since its last reset: its stream offsets
        self._resyncing = False
        self._tail = b""  # resync: the end of a marker split across reads
        self._last = 0.0  # resync: when the last discarded byte was read

    # -- the contract -----------------------------------------------------------------------
    def reset(self) -> None:
        self.framer.reset()
        self._fed = 0
        self._resyncing = False
        self._tail = b""

    def deadline(self):
        return self.framer.deadline() if self.timed and not self._resyncing else None

    def feed(self, data, now: float) -> list:
        out: list = []
        if self._resyncing:
            data = self._skip(bytes(data), now)
            if self._resyncing or not data:
                return out
        if data or self.timed:
            self._feed(bytes(data), now, out)
        return out

    def poll(self, now: float) -> list:
        out: list = []
        if not self.timed or self._resyncing:
            return out
        try:
            frames = self.framer.poll(now)
        except BadFrame as exc:
            self._bad_frame(exc, out)
        except FramingError as exc:  # fatal errors are raised by feed, never first by poll
            self._fatal(exc, b"", 0, now, out)
        else:
            self._emit(frames, out)
        return out

    def close(self) -> list:
        out: list = []
        if not self._resyncing:
            try:
                self._emit(self.framer.flush(), out)
            except FramingError as exc:
                if isinstance(exc, BadFrame):
                    self._emit(exc.frames, out)
                    out.append(_fault(exc, bytes(exc.frame[:FAULT_SAMPLE_BYTES]), False))
                    self.faults += 1
            left = self.framer.buffered
            if left:
                self.faults += 1
                out.append(
                    Fault(
                        "truncated_frame",
                        f"{left} bytes of an unfinished frame discarded: the port closed",
                        b"",
                        False,
                        {ERROR_SIZE: str(left)},
                    )
                )
        self.reset()
        return out

    # -- inside -------------------------------------------------------------------------------
    def _emit(self, frames, out: list) -> None:
        if frames:
            self.frames += len(frames)
            out.extend(frames)

    def _feed(self, data: bytes, now: float, out: list) -> None:
        framer = self.framer
        # `chunk` is what this call gave the framer, from stream offset `chunk_start`: what a
        # fatal error leaves to resynchronise on. (Before a chunk a stream framer holds at most
        # the start of one frame, so nothing after an error's offset lies outside the chunk.)
        chunk, chunk_start = data, self._fed
        self._fed += len(data)
        while True:
            try:
                frames = framer.feed(data, now) if self.timed else framer.feed(data)
            except BadFrame as exc:
                self._bad_frame(exc, out)
                if self.timed:
                    return  # the framer kept the later bytes for poll()
                data = b""  # a stream framer may hold complete frames after the bad one
                continue
            except FramingError as exc:
                rest = self._fatal(exc, chunk, chunk_start, now, out)
                if not rest:
                    return
                chunk, chunk_start = rest, self._fed
                self._fed += len(rest)
                data = rest
                continue
            self._emit(frames, out)
            return

    def _bad_frame(self, exc: BadFrame, out: list) -> None:
        """Recoverable: the framer dropped one frame and resynchronised by itself."""
        self._emit(exc.frames, out)
        self.faults += 1
        out.append(_fault(exc, bytes(exc.frame[:FAULT_SAMPLE_BYTES]), False))

    def _fatal(self, exc: FramingError, chunk: bytes, chunk_start: int, now: float, out: list) -> bytes:
        """Report `exc`, reset the framer, start resynchronising on what follows the bad
        frame's start in `chunk`; returns the bytes after the restart point (b"" if none)."""
        self._emit(getattr(exc, "frames", None), out)
        self.faults += 1
        offset = getattr(exc, "offset", None)
        cut = max(0, offset - chunk_start) if isinstance(offset, int) else 0
        cut = min(cut, len(chunk))
        out.append(_fault(exc, bytes(chunk[cut : cut + FAULT_SAMPLE_BYTES]), True))
        self.framer.reset()
        self._fed = 0
        self._resyncing = True
        self._tail = b""
        self._last = now
        rest = chunk[cut:]
        if self._kind == _KEEP_FROM and isinstance(offset, int) and offset >= chunk_start and rest:
            rest = rest[1:]  # the marker that started the bad frame: look for the next one
            self.discarded += 1
        return self._skip(rest, now)

    def _skip(self, data: bytes, now: float) -> bytes:
        """Discard resync input; returns what follows the restart point ("" while resyncing)."""
        if self._kind == _GAP:
            if now - self._last >= self.resync_gap:
                self._resyncing = False
                return data
            if data:
                self._last = now
                self.discarded += len(data)
            return b""
        marker = self._marker
        tail = self._tail
        buf = tail + data
        idx = buf.find(marker)
        if idx < 0:
            keep = len(marker) - 1
            self._tail = buf[-keep:] if keep and buf else b""
            self.discarded += len(data)
            return b""
        end = idx + len(marker) if self._kind == _SKIP_PAST else idx
        self._resyncing = False
        self._tail = b""
        rest = buf[end:]
        self.discarded += max(0, len(buf) - len(rest) - len(tail))
        return rest
