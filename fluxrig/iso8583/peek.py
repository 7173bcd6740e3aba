"""Sans-IO helpers for ISO 8583 transports: a quick MTI and bitmap sanity check, and TPDU /
fixed protocol headers (strip, keep, mirror with source and destination swapped).

`peek(body, encoding)` looks at the first bytes of a message (after any header) without
decoding it: the MTI must be four digits in the transport's encoding and the primary (and, if
announced, secondary and tertiary) bitmap must fit, as binary or as hex characters. It
returns `(mti, bitmaps)` or raises `BadFrame` naming the offset, so an I/O gear can drop a
peer that sends garbage before any codec runs.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError

__all__ = ["BadFrame", "peek", "split_header", "mirror_tpdu", "TPDU_LENGTH", "ENCODINGS"]

TPDU_LENGTH = 5
ENCODINGS = ("ascii", "ebcdic", "bcd")
_HEX_DIGITS = b"0123456789ABCDEFabcdef"


class BadFrame(RemoteProtocolError):
    """A frame that cannot be an ISO 8583 message (bad MTI, truncated bitmap, short header)."""

    def __init__(self, reason: str, offset: int):
        self.reason = reason
        super().__init__(reason, offset)


def _mti(body: bytes, encoding: str) -> tuple[str, int]:
    if encoding == "bcd":
        if len(body) < 2:
            raise BadFrame("message shorter than a BCD MTI", 0)
        text = body[:2].hex()
        if not text.isdigit():
            raise BadFrame(f"MTI {text!r} is not BCD digits", 0)
        return text, 2
    if len(body) < 4:
        raise BadFrame("message shorter than an MTI", 0)
    raw = body[:4]
    if encoding == "ebcdic":
        if not all(0xF0 <= b <= 0xF9 for b in raw):
            raise BadFrame(f"MTI bytes {raw.hex()} are not EBCDIC digits", 0)
        return "".join(chr(b - 0xC0) for b in raw), 4
    if not raw.isdigit():
        raise BadFrame(f"MTI {raw!r} is not four ASCII digits", 0)
    return raw.decode("ascii"), 4


def peek(body: bytes, encoding: str = "ascii") -> tuple[str, int]:
    """(mti, bitmap count) if `body` plausibly starts an ISO 8583 message; BadFrame otherwise."""
    mti, pos = _mti(body, encoding)
    count = 0
    # hex characters if the next 16 bytes are all hex digits (translate deletes hex digits)
    hex_bitmap = encoding != "bcd" and len(body) >= pos + 16 and not body[pos : pos + 16].translate(None, _HEX_DIGITS)
    width = 16 if hex_bitmap else 8
    while True:
        chunk = body[pos : pos + width]
        if len(chunk) < width:
            raise BadFrame(f"bitmap {count + 1} truncated: {len(chunk)} of {width} bytes", pos)
        count += 1
        first = int(chunk[:2], 16) if hex_bitmap else chunk[0]
        pos += width
        if not first & 0x80 or count == 3:
            return mti, count


def split_header(frame: bytes, size: int) -> tuple[bytes, bytes]:
    """(header, body) for a fixed-size header; BadFrame when the frame is shorter."""
    if len(frame) < size:
        raise BadFrame(f"frame of {len(frame)} bytes is shorter than the {size}-byte header", 0)
    return frame[:size], frame[size:]


def mirror_tpdu(tpdu: bytes) -> bytes:
    """The reply TPDU: same ID, destination and source addresses swapped."""
    if len(tpdu) != TPDU_LENGTH:
        return tpdu
    return tpdu[:1] + tpdu[3:5] + tpdu[1:3]
