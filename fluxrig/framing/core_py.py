"""Sans-IO stream framers: delimiter, length prefix (binary, ASCII, BCD, VAP), fixed, SLIP, raw.

Job: split a byte stream into frames and wrap payloads into frames, for io_tcp, io_iso8583 and
io_serial. No I/O here: the gear reads bytes, calls `feed`, emits the frames, writes `encode`.

This file is compiled twice: run as plain Python (`fluxrig.framing.core_py`, the `...Py` names)
and compiled by Cython with `core_c.pxd` beside it into `fluxrig.framing.core_c` (C classes,
typed locals); `fluxrig.framing.core` binds the public names to one of the two. So it must stay
plain Python: no `cython` import, no C types here; the .pxd adds them. Both builds raise the
same error classes (`fluxrig.framing.errors`).

Contract of every framer:
  feed(data) -> list[bytes]   complete frames (maybe none); keeps the remainder. `feed(b"")`
                              parses what is already buffered (after a recoverable error).
  flush() -> list[bytes]      end of stream: frames that only the end completes (delimiter
                              framing: the last unterminated line; prefix mode: the last frame).
  encode(payload) -> bytes    one frame; raises EncodeError / PayloadTooLarge (local errors).
  buffered                    bytes held, waiting for the rest of a frame.
  reset()                     forget everything, including a fatal error; offsets restart at 0.
Limits: `max_frame_bytes` (default DEFAULT_MAX_FRAME_BYTES, 1 MiB) bounds every frame and so the
buffer (at most one partial frame plus one fed chunk). Over it: FrameTooLarge(size, limit,
offset), fatal: the framer raises it again on every feed until reset(); the gear closes the
connection. Errors carry `frames`, the good frames completed before them in the same call.
Cost: linear; a search resumes where the previous feed stopped; frames are cut with bytes
slicing, `find` and `split`, never a Python loop per byte.
"""

from __future__ import annotations

from fluxrig.errors import FrameTooLarge
from fluxrig.framing.errors import BadEscape, BadLengthPrefix, EncodeError, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "PREFIX_KINDS",
    "StreamFramer",
    "DelimiterFramer",
    "LengthPrefixFramer",
    "FixedFramer",
    "SlipFramer",
    "RawFramer",
    "SLIP_END",
    "SLIP_ESC",
    "SLIP_ESC_END",
    "SLIP_ESC_ESC",
]

#: Default bound of one frame (and so of a framer's buffer): 1 MiB, as the Go io_tcp reader.
DEFAULT_MAX_FRAME_BYTES = 1 << 20

#: Length-prefix kinds. Kept as small ints inside the framer (the compiled twin switches on a
#: C int); the names are the public vocabulary.
PREFIX_KINDS = ("binary", "ascii4", "bcd2", "vap")
_HEADER_SIZES = {"ascii4": 4, "bcd2": 2, "vap": 4}

SLIP_END = 0xC0
SLIP_ESC = 0xDB
SLIP_ESC_END = 0xDC
SLIP_ESC_ESC = 0xDD


def _as_bytes(data) -> bytes:
    # One type inside the hot loops: the compiled twin indexes and slices `bytes` in C.
    return data if type(data) is bytes else bytes(data)


def _check_limit(max_frame_bytes) -> int:
    limit = int(max_frame_bytes)
    if limit < 1:
        raise ValueError(f"max_frame_bytes must be >= 1, got {max_frame_bytes!r}")
    return limit


class StreamFramer:
    """What every stream framer shares: the frame limit, the pending bytes, the stream offset
    of their first byte, and the fatal error that stops the framer until reset()."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = _check_limit(max_frame_bytes)
        self._buf = bytearray()
        self._error = None
        self._base = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf = bytearray()
        self._error = None
        self._base = 0

    def flush(self) -> list:
        """End of stream. A truncated frame cannot be completed: it stays counted in
        `buffered` for the gear to log, and nothing is returned."""
        if self._error is not None:
            raise self._rearm()
        return []

    def _fail(self, exc, frames):
        # Fatal: remember the error, so every later feed raises it until reset().
        exc.frames = frames
        self._error = exc
        return exc

    def _rearm(self):
        exc = self._error
        exc.frames = []
        return exc


class DelimiterFramer(StreamFramer):
    """Frames separated by a delimiter.

    `position="suffix"` (default): each frame ends with the delimiter. `position="prefix"`: each
    frame starts with it and runs to the next one (bytes before the first delimiter are
    counted in `discarded` and dropped; the last frame is only known complete at the next
    delimiter or at `flush()`). `include_delimiter=True` keeps the delimiter in the frame. `append=True`
    makes `encode` add it (suffix: after, prefix: before); otherwise `encode` passes payloads
    through untouched. Newline mode (delimiter b"\\n" or empty, the default) also strips one CR
    before the LF (CR LF or LF endings), unless `include_delimiter` or `strip_cr=False`.
    A frame's size is its content without the delimiter.
    """

    def __init__(
        self,
        delimiter: bytes = b"\n",
        position: str = "suffix",
        include_delimiter: bool = False,
        append: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        strip_cr=None,
    ):
        delim = bytes(delimiter)
        if not delim:
            delim = b"\n"
        if position != "suffix" and position != "prefix":
            raise ValueError(f"delimiter position must be 'suffix' or 'prefix', got {position!r}")
        self.delimiter = delim
        self.position = position
        self.include_delimiter = bool(include_delimiter)
        self.append = bool(append)
        self.strip_cr = (delim == b"\n") if strip_cr is None else bool(strip_cr)
        StreamFramer.__init__(self, max_frame_bytes)
        self.discarded = 0
        self._prefix = position == "prefix"
        self._scan = 0
        self._synced = not self._prefix

    def reset(self) -> None:
        StreamFramer.reset(self)
        self._scan = 0
        self._synced = not self._prefix

    def feed(self, data) -> list:
        if self._error is not None:
            raise self._rearm()
        buf = self._buf
        if buf:
            buf += data
            if self._synced:
                # Quick answer while a long frame accumulates: search only the new part, so
                # a 1 MiB frame arriving in 64 KiB chunks costs linear time, not quadratic.
                dl = len(self.delimiter)
                n = len(buf)
                if buf.find(self.delimiter, self._scan) < 0:
                    if n - dl + 1 > self._scan:
                        self._scan = n - dl + 1
                    content = n - dl if self._prefix else n
                    if content - dl + 1 > self.max_frame_bytes:
                        raise self._fail(FrameTooLarge(content, self.max_frame_bytes, self._base), [])
                    return []
            work = bytes(buf)
            self._buf = bytearray()
        else:
            if not data:
                return []
            work = _as_bytes(data)
        return self._split(work)

    def _split(self, work: bytes) -> list:
        frames = []
        delim = self.delimiter
        dl = len(delim)
        n = len(work)
        maxb = self.max_frame_bytes
        base = self._base
        scan = self._scan
        pos = 0
        if not self._synced:
            # Prefix mode before the first delimiter: drop the preamble, but keep a tail that
            # may be the start of a delimiter split across feeds.
            idx = work.find(delim, 0)
            if idx < 0:
                cut = n - dl + 1 if n > dl - 1 else 0
                self.discarded += cut
                self._base = base + cut
                self._buf += work[cut:]
                self._scan = 0
                return frames
            self.discarded += idx
            self._synced = True
            pos = idx
            scan = idx + dl
        if self._prefix:
            incl = self.include_delimiter
            while True:
                idx = work.find(delim, scan)
                if idx < 0:
                    break
                clen = idx - pos - dl
                if clen > maxb:
                    raise self._fail(FrameTooLarge(clen, maxb, base + pos), frames)
                if incl:
                    frames.append(work[pos:idx])
                else:
                    frames.append(work[pos + dl : idx])
                pos = idx
                scan = idx + dl
            content = n - pos - dl
        elif not self.include_delimiter:
            # Suffix mode, delimiter dropped (the common case): one bytes.split cuts every
            # frame in C, instead of a find() call per frame. `pos` is 0 here.
            frames = work.split(delim)
            rest = frames.pop()
            if frames:
                # No part of a chunk within the limit can be over it: skip the check then.
                if n > maxb and max(map(len, frames)) > maxb:
                    raise self._oversize_part(frames, base, dl, maxb)
                if self.strip_cr and work.find(b"\r") >= 0:
                    frames = [f[: len(f) - 1] if f.endswith(b"\r") else f for f in frames]
            content = len(rest)
            pos = n - content
            scan = pos
        else:
            incl = self.include_delimiter
            strip = self.strip_cr and not incl
            while True:
                idx = work.find(delim, scan)
                if idx < 0:
                    break
                clen = idx - pos
                if clen > maxb:
                    raise self._fail(FrameTooLarge(clen, maxb, base + pos), frames)
                if incl:
                    frames.append(work[pos : idx + dl])
                elif strip and clen > 0 and work[idx - 1] == 13:
                    frames.append(work[pos : idx - 1])
                else:
                    frames.append(work[pos:idx])
                pos = idx + dl
                scan = pos
            content = n - pos
        # The next delimiter cannot start before n - dl + 1, so the pending frame already has
        # at least content - dl + 1 bytes: over the limit means it can never fit.
        if content - dl + 1 > maxb:
            raise self._fail(FrameTooLarge(content, maxb, base + pos), frames)
        if pos < n:
            self._buf += work[pos:]
        self._base = base + pos
        if n - dl + 1 > scan:
            scan = n - dl + 1
        self._scan = scan - pos
        return frames

    def _oversize_part(self, parts, base, dl, maxb):
        # Slow path of the split fast path: find the first part over the limit, for its offset
        # and the good frames before it.
        offset = base
        for i in range(len(parts)):
            if len(parts[i]) > maxb:
                frames = parts[:i]
                if self.strip_cr:
                    frames = [f[: len(f) - 1] if f.endswith(b"\r") else f for f in frames]
                return self._fail(FrameTooLarge(len(parts[i]), maxb, offset), frames)
            offset += len(parts[i]) + dl
        raise AssertionError("no part over the limit")

    def flush(self) -> list:
        if self._error is not None:
            raise self._rearm()
        frames = []
        work = bytes(self._buf)
        n = len(work)
        dl = len(self.delimiter)
        base = self._base
        self._buf = bytearray()
        self._scan = 0
        self._base = base + n
        if not self._synced:
            self.discarded += n
            return frames
        if n == 0:
            return frames
        if self._prefix:
            clen = n - dl
            if clen > self.max_frame_bytes:
                raise self._fail(FrameTooLarge(clen, self.max_frame_bytes, base), frames)
            frames.append(work if self.include_delimiter else work[dl:])
            self._synced = False
        else:
            if n > self.max_frame_bytes:
                raise self._fail(FrameTooLarge(n, self.max_frame_bytes, base), frames)
            if self.strip_cr and not self.include_delimiter and work[n - 1] == 13:
                work = work[: n - 1]
            frames.append(work)
        return frames

    def encode(self, payload) -> bytes:
        """Frame one payload. With `append`, a payload holding the delimiter is refused (the
        peer would read it as two frames); without `append`, payloads pass through as is."""
        data = _as_bytes(payload)
        if not self.append:
            return data
        if len(data) > self.max_frame_bytes:
            raise PayloadTooLarge("longer than max_frame_bytes", len(data), self.max_frame_bytes)
        if data.find(self.delimiter) >= 0:
            raise EncodeError(f"payload contains the delimiter {self.delimiter!r}", len(data))
        if self._prefix:
            return self.delimiter + data
        return data + self.delimiter


class LengthPrefixFramer(StreamFramer):
    """Frames preceded by their length.

    kind="binary": `size` (2 or 4) bytes, `endian` big or little (jPOS NAC/Post/Raw).
    kind="ascii4": 4 ASCII decimal digits, "0123" (jPOS ASCIIChannel).
    kind="bcd2":   2 bytes of packed BCD, 4 digits, 0x01 0x23 (jPOS NCC).
    kind="vap":    2-byte big-endian length + 2 reserved bytes (Visa CS/VAP). The reserved
                   bytes are not checked on read (jPOS ignores them too); `encode` writes
                   `reserved` (default 00 00). `keep_header=True` returns them with the frame.
    `includes_header`: the value counts the prefix's own bytes (all 4 for vap).
    `keep_header`: frames are returned with their prefix (for pass-through bridges).
    `allow_empty`: a zero body is a frame (b"", some hosts' keep-alive); else BadLengthPrefix.
    Raises BadLengthPrefix (fatal) for an unreadable prefix, FrameTooLarge when the announced
    body exceeds `max_frame_bytes`, as soon as the prefix is complete.
    """

    def __init__(
        self,
        size: int = 2,
        endian: str = "big",
        includes_header: bool = False,
        kind: str = "binary",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        allow_empty: bool = False,
        keep_header: bool = False,
        reserved: bytes = b"\x00\x00",
    ):
        if kind not in PREFIX_KINDS:
            raise ValueError(f"length prefix kind must be one of {', '.join(PREFIX_KINDS)}, got {kind!r}")
        if endian != "big" and endian != "little":
            raise ValueError(f"length endian must be 'big' or 'little', got {endian!r}")
        if kind == "binary":
            if size != 2 and size != 4:
                raise ValueError(f"binary length prefix size must be 2 or 4, got {size!r}")
            hdr = size
            top = 0xFFFF if size == 2 else 0xFFFFFFFF
        else:
            hdr = _HEADER_SIZES[kind]
            top = 0xFFFF if kind == "vap" else 9999
            endian = "big"
        reserved = bytes(reserved)
        if len(reserved) != 2:
            raise ValueError(f"vap reserved bytes must be 2 bytes, got {reserved!r}")
        self.kind = kind
        self.size = hdr
        self.endian = endian
        self.includes_header = bool(includes_header)
        StreamFramer.__init__(self, max_frame_bytes)
        self.allow_empty = bool(allow_empty)
        self.keep_header = bool(keep_header)
        self.reserved = reserved
        self._kind = PREFIX_KINDS.index(kind)
        self._hdr = hdr
        self._big = endian == "big"
        self._adj = hdr if self.includes_header else 0
        # Largest body the prefix can announce, and so the largest payload `encode` accepts.
        self.max_payload = min(self.max_frame_bytes, top - self._adj)
        self._need = hdr

    def reset(self) -> None:
        StreamFramer.reset(self)
        self._need = self._hdr

    def feed(self, data) -> list:
        if self._error is not None:
            raise self._rearm()
        buf = self._buf
        if buf:
            buf += data
            # Nothing to do until the prefix, or the frame it announced, is all here.
            if len(buf) < self._need:
                return []
            work = bytes(buf)
            self._buf = bytearray()
        else:
            if not data:
                return []
            work = _as_bytes(data)
            if len(work) < self._need:
                self._buf += work
                return []
        return self._split(work)

    def _split(self, work: bytes) -> list:
        frames = []
        n = len(work)
        hdr = self._hdr
        kind = self._kind
        big = self._big
        adj = self._adj
        maxb = self.max_frame_bytes
        keep = self.keep_header
        allow_empty = self.allow_empty
        pos = 0
        need = hdr
        while n - pos >= hdr:
            # Decode the prefix; kinds are 0 binary, 1 ascii4, 2 bcd2, 3 vap (PREFIX_KINDS).
            if kind == 0:
                if hdr == 2:
                    if big:
                        value = (work[pos] << 8) | work[pos + 1]
                    else:
                        value = work[pos] | (work[pos + 1] << 8)
                elif big:
                    # Shift the accumulated value, not the byte: in the compiled twin a byte
                    # shifted by 24 would overflow a C int; `value` is a 64-bit integer.
                    value = work[pos]
                    value = (value << 8) | work[pos + 1]
                    value = (value << 8) | work[pos + 2]
                    value = (value << 8) | work[pos + 3]
                else:
                    value = work[pos + 3]
                    value = (value << 8) | work[pos + 2]
                    value = (value << 8) | work[pos + 1]
                    value = (value << 8) | work[pos]
            elif kind == 3:
                value = (work[pos] << 8) | work[pos + 1]
            else:
                value = self._decimal_prefix(work, pos, frames)
            body = value - adj
            if body <= 0 and (body < 0 or not allow_empty):
                raise self._fail(
                    BadLengthPrefix(
                        f"announces {value} bytes, leaving a body of {body}",
                        self._base + pos,
                        work[pos : pos + hdr],
                        PREFIX_KINDS[kind],
                        frames,
                    ),
                    frames,
                )
            if body > maxb:
                raise self._fail(FrameTooLarge(body, maxb, self._base + pos), frames)
            end = pos + hdr + body
            if end > n:
                need = hdr + body
                break
            if keep:
                frames.append(work[pos:end])
            else:
                frames.append(work[pos + hdr : end])
            pos = end
        if pos < n:
            self._buf += work[pos:]
        self._need = need
        self._base += pos
        return frames

    def _decimal_prefix(self, work, pos, frames):
        # ascii4: four '0'..'9' characters; bcd2: two bytes of two 0..9 nibbles each.
        value = 0
        if self._kind == 1:
            for i in range(pos, pos + 4):
                digit = work[i] - 48
                if digit < 0 or digit > 9:
                    raise self._fail(
                        BadLengthPrefix(
                            f"byte {i - pos} (0x{work[i]:02X}) is not an ASCII digit",
                            self._base + pos,
                            work[pos : pos + 4],
                            "ascii4",
                            frames,
                        ),
                        frames,
                    )
                value = value * 10 + digit
        else:
            for i in range(pos, pos + 2):
                high = work[i] >> 4
                low = work[i] & 0x0F
                if high > 9 or low > 9:
                    raise self._fail(
                        BadLengthPrefix(
                            f"byte {i - pos} (0x{work[i]:02X}) is not packed BCD",
                            self._base + pos,
                            work[pos : pos + 2],
                            "bcd2",
                            frames,
                        ),
                        frames,
                    )
                value = value * 100 + high * 10 + low
        return value

    def encode(self, payload) -> bytes:
        data = _as_bytes(payload)
        n = len(data)
        if n == 0 and not self.allow_empty:
            raise EncodeError("empty frames are not allowed (allow_empty is off)", 0)
        if n > self.max_payload:
            raise PayloadTooLarge(
                f"the {self.kind} prefix of {self._hdr} bytes (max_frame_bytes={self.max_frame_bytes}) "
                f"carries at most {self.max_payload}",
                n,
                self.max_payload,
            )
        value = n + self._adj
        if self._kind == 0:
            return value.to_bytes(self._hdr, "big" if self._big else "little") + data
        if self._kind == 1:
            return b"%04d" % value + data
        if self._kind == 2:
            return bytes.fromhex("%04d" % value) + data
        return value.to_bytes(2, "big") + self.reserved + data


class FixedFramer(StreamFramer):
    """Frames of exactly `size` bytes. `encode` refuses other sizes unless `pad` (one byte)
    is set, which right-pads shorter payloads."""

    def __init__(self, size: int, pad=None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        size = int(size)
        StreamFramer.__init__(self, max_frame_bytes)
        if size < 1 or size > self.max_frame_bytes:
            raise ValueError(f"fixed frame size must be 1..{self.max_frame_bytes}, got {size}")
        if pad is not None:
            pad = bytes(pad)
            if len(pad) != 1:
                raise ValueError(f"pad must be one byte, got {pad!r}")
        self.size = size
        self.pad = pad

    def feed(self, data) -> list:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self.size:
                return []
            work = bytes(buf)
            self._buf = bytearray()
        else:
            if not data:
                return []
            work = _as_bytes(data)
        frames = []
        size = self.size
        n = len(work)
        pos = 0
        while n - pos >= size:
            frames.append(work[pos : pos + size])
            pos += size
        if pos < n:
            self._buf += work[pos:]
        self._base += pos
        return frames

    def encode(self, payload) -> bytes:
        data = _as_bytes(payload)
        n = len(data)
        if n == self.size:
            return data
        if n > self.size:
            raise PayloadTooLarge(f"fixed framing carries exactly {self.size} bytes", n, self.size)
        if self.pad is None:
            raise EncodeError(f"fixed framing carries exactly {self.size} bytes and no pad is set", n, self.size)
        return data + self.pad * (self.size - n)


class SlipFramer(StreamFramer):
    """RFC 1055 SLIP: frames end with END (0xC0); ESC (0xDB) ESC_END (0xDC) stands for a data
    0xC0, ESC ESC_ESC (0xDD) for a data 0xDB. Empty frames (END END, line-noise flushes) are
    skipped. An ESC followed by anything else drops that frame with BadEscape (recoverable:
    later frames survive; RFC 1055's sample code would pass the byte through, the Linux
    driver drops the frame as here). `encode` escapes, appends END and, with `leading_end`
    (default), also starts with END so the receiver discards any line noise before it.
    The limit applies to the decoded frame; escaped input over twice the limit can never fit.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, leading_end: bool = True):
        StreamFramer.__init__(self, max_frame_bytes)
        self.leading_end = bool(leading_end)
        self._scan = 0

    def reset(self) -> None:
        StreamFramer.reset(self)
        self._scan = 0

    def feed(self, data) -> list:
        if self._error is not None:
            raise self._rearm()
        buf = self._buf
        if buf:
            buf += data
            n = len(buf)
            if buf.find(b"\xc0", self._scan) < 0:
                self._scan = n
                if n > 2 * self.max_frame_bytes:
                    raise self._fail(FrameTooLarge(n, self.max_frame_bytes, self._base), [])
                return []
            work = bytes(buf)
            self._buf = bytearray()
        else:
            if not data:
                return []
            work = _as_bytes(data)
        return self._split(work)

    def _split(self, work: bytes) -> list:
        frames = []
        n = len(work)
        maxb = self.max_frame_bytes
        base = self._base
        pos = 0
        scan = self._scan
        while True:
            idx = work.find(b"\xc0", scan)
            if idx < 0:
                break
            raw_len = idx - pos
            if raw_len > 0:
                if raw_len > 2 * maxb:
                    raise self._fail(FrameTooLarge(raw_len, maxb, base + pos), frames)
                frame = work[pos:idx]
                if frame.find(b"\xdb") >= 0:
                    escapes = frame.count(b"\xdb")
                    # Every ESC must start ESC ESC_END or ESC ESC_ESC; those pairs cannot
                    # overlap (their second byte is never ESC), so counting is exact.
                    if escapes != frame.count(b"\xdb\xdc") + frame.count(b"\xdb\xdd"):
                        # Recoverable: keep what follows the bad frame, then report it.
                        self._buf += work[idx + 1 :]
                        self._base = base + idx + 1
                        self._scan = 0
                        raise BadEscape(
                            "ESC (0xDB) not followed by ESC_END (0xDC) or ESC_ESC (0xDD)", base + pos, frame, frames
                        )
                    # ESC_END first: replacing ESC_ESC first could create a false ESC ESC_END.
                    frame = frame.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
                    if len(frame) > maxb:
                        raise self._fail(FrameTooLarge(len(frame), maxb, base + pos), frames)
                elif raw_len > maxb:
                    raise self._fail(FrameTooLarge(raw_len, maxb, base + pos), frames)
                frames.append(frame)
            pos = idx + 1
            scan = pos
        if n - pos > 2 * maxb:
            raise self._fail(FrameTooLarge(n - pos, maxb, base + pos), frames)
        if pos < n:
            self._buf += work[pos:]
        self._base = base + pos
        self._scan = n - pos
        return frames

    def encode(self, payload) -> bytes:
        data = _as_bytes(payload)
        n = len(data)
        if n == 0:
            raise EncodeError("SLIP cannot carry an empty frame (receivers skip it)", 0)
        if n > self.max_frame_bytes:
            raise PayloadTooLarge("longer than max_frame_bytes", n, self.max_frame_bytes)
        # ESC first, so the ESCs introduced for END are not escaped again.
        data = data.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
        if self.leading_end:
            return b"\xc0" + data + b"\xc0"
        return data + b"\xc0"


class RawFramer(StreamFramer):
    """No framing (`framing: none`): every chunk read is a frame, every payload is written as
    is. For byte-transparent bridges, where the peer defines no message boundaries."""

    def feed(self, data) -> list:
        if not data:
            return []
        work = _as_bytes(data)
        # A chunk larger than the limit is cut, not refused: there are no frames to break.
        n = len(work)
        maxb = self.max_frame_bytes
        if n <= maxb:
            return [work]
        return [work[i : i + maxb] for i in range(0, n, maxb)]

    def encode(self, payload) -> bytes:
        return _as_bytes(payload)
