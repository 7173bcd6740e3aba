"""Log-safe views of ISO 8583 fields: PAN masking and sensitivity-driven redaction.

Job: never let a PAN, track data or a PIN block reach a log line. `mask_pan` keeps the first
six and last four digits (PCI DSS display rule) of a 13-19 digit PAN and only the last four of
a shorter one; `log_safe(fields, masked)` returns a copy of a decoded message in which every
field named in `masked` ({field number: sensitivity}) is redacted: `pan` fields through
mask_pan, anything else that looks like track data keeps its masked PAN and loses the rest,
other strings and bytes are replaced by '*' of the same length, composites are redacted leaf
by leaf. The input is never modified.

Card numbers in text and bytes nobody decoded (a log line, the raw payload of a frame from a
plain TCP or serial link, a transform's output), with no spec to say where the PAN is:

* `mask_card_numbers(text)`: a run of 13-19 digits that passes Luhn is masked by mask_pan; a
  longer run is masked as a whole (first six and last four kept) when any 13-19 digit window
  in it passes Luhn, because fixed-format frames glue the PAN to the fields around it (an
  ASCII ISO 8583 frame is one 60-digit run: "0200 7020.. 16 4111111111111111 000000 .."), and
  any run over MAX_SCANNED_RUN digits is masked unscanned (the scan is bounded); a card number
  written in groups ("4111 1111 1111 1111", "3782-822463-10005") is masked the same way.
* `mask_card_bytes(data)`: the same on bytes: ASCII digit runs (masked with b"*"), EBCDIC
  digit runs (0xF0-0xF9, masked with EBCDIC '*', 0x5C) and, in a payload that is not text
  (control bytes, or not UTF-8), packed BCD: runs of decimal nibbles, masked nibble by nibble
  with 0xF (a binary ISO 8583 frame carries field 2 as BCD). The result has the input's length.

Over-masking is the accepted price: a long digit string that happens to hold a Luhn-valid
window is masked in a log, a PAN is never shown in clear. Text that was masked already where
its structure was known (fluxrig.redact.log_view of a message) is passed to a log call as a
`LogSafe` argument: `mask_log_message` masks the rest of the line but not that part again, so a
19-digit nanosecond timestamp in it that happens to pass Luhn (1 in 10) is not starred out.
"""

from __future__ import annotations

import re

__all__ = [
    "MASK",
    "mask_pan",
    "mask_value",
    "log_safe",
    "mask_card_numbers",
    "mask_card_bytes",
    "luhn_valid",
    "MAX_SCANNED_RUN",
    "LogSafe",
    "mask_log_message",
]

MASK = "*"
_TRACK = re.compile(r"%?[A-Z]?([0-9]{6,19})([=D^])(.*)", re.S)
_CARD_RUN = re.compile(r"(?<![0-9])[0-9]{13,}(?![0-9])")
# One pass over a log line finds both: a run of 13+ digits, or groups of digits with one
# separator kind throughout ("4111 1111 1111 1111", "3782-822463-10005"; group 1 is set).
_CARD_TEXT = re.compile(r"(?<![0-9])[0-9]{4}(?:[0-9]{9,}(?![0-9])|([ -])[0-9]{2,7}(?:\1[0-9]{1,7}){1,3}(?![0-9]))")
_ASCII_RUN = re.compile(rb"(?<![0-9])[0-9]{13,}(?![0-9])")
_EBCDIC_RUN = re.compile(rb"(?<![\xf0-\xf9])[\xf0-\xf9]{13,}(?![\xf0-\xf9])")
_EBCDIC_TO_ASCII = bytes.maketrans(bytes(range(0xF0, 0xFA)), b"0123456789")
_TEXT_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Digit runs longer than this are masked without looking for a Luhn-valid window in them
#: (the scan costs up to 7 checks per digit; a genuine run that long holds one anyway).
MAX_SCANNED_RUN = 64
# Each digit's value once doubled and its digits summed (Luhn), as the ASCII digit itself.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of an ASCII digit string."""
    if not digits or not (digits.isdigit() and digits.isascii()):
        return False
    rev = digits[::-1].encode("ascii")
    # byte sums: every digit counts as its ASCII code, 48 too many per digit
    return (sum(rev[0::2]) + sum(rev[1::2].translate(_DOUBLED)) - 48 * len(rev)) % 10 == 0


def _holds_card(run: str) -> bool:
    """A 13-19 digit run that passes Luhn, or a longer one with such a window (see above)."""
    n = len(run)
    if n <= 19:
        return luhn_valid(run)
    if n > MAX_SCANNED_RUN:
        return True
    for i in range(n - 12):
        for end in range(i + 13, min(i + 19, n) + 1):
            if luhn_valid(run[i:end]):
                return True
    return False


def _mask_run(m):
    run = m.group(0)
    return mask_pan(run) if _holds_card(run) else run


def _mask_text(m):
    sep = m.group(1)
    if sep is None:
        return _mask_run(m)
    text = m.group(0)
    digits = text.replace(sep, "")
    if not 13 <= len(digits) <= 19 or not luhn_valid(digits):
        return text
    masked = iter(mask_pan(digits))
    return "".join(c if c == sep else next(masked) for c in text)


def mask_card_numbers(text: str) -> str:
    """`text` with its card numbers masked by mask_pan (see the module docstring): Luhn-valid
    13-19 digit runs, longer runs holding one, and grouped card numbers."""
    if len(text) < 13:
        return text
    return _CARD_TEXT.sub(_mask_text, text)


def _mask_digit_bytes(data: bytes, pattern, to_ascii, star: int) -> bytes:
    out = None
    for m in pattern.finditer(data):
        run = m.group(0).translate(to_ascii) if to_ascii is not None else m.group(0)
        text = run.decode("ascii")
        if not _holds_card(text):
            continue
        out = bytearray(data) if out is None else out
        for k, c in enumerate(mask_pan(text), m.start()):
            if c == MASK:
                out[k] = star
    return data if out is None else bytes(out)


def mask_card_bytes(data: bytes) -> bytes:
    """`data` with its card numbers masked in place: ASCII and EBCDIC digit runs, and packed
    BCD when `data` is not text (see the module docstring). Same length as `data`."""
    data = bytes(data)
    if len(data) < 7:
        return data
    data = _mask_digit_bytes(data, _ASCII_RUN, None, 0x2A)
    data = _mask_digit_bytes(data, _EBCDIC_RUN, _EBCDIC_TO_ASCII, 0x5C)
    try:
        data.decode("utf-8")
        binary = _TEXT_CONTROL.search(data) is not None
    except UnicodeDecodeError:
        binary = True
    if binary:  # BCD: one digit per nibble; masked nibbles become F (the BCD filler)
        nibbles = data.hex()
        masked = _CARD_RUN.sub(
            lambda m: mask_pan(m.group(0)).replace(MASK, "f") if _holds_card(m.group(0)) else m.group(0), nibbles
        )
        if masked != nibbles:
            data = bytes.fromhex(masked)
    return data


def mask_pan(value):
    """'4111111111111111' -> '411111******1111'. Non-digits are masked too; bytes stay bytes."""
    if isinstance(value, (bytes, bytearray)):
        return mask_pan(bytes(value).decode("latin-1")).encode("latin-1")
    s = str(value)
    n = len(s)
    if n >= 13:
        return s[:6] + MASK * (n - 10) + s[n - 4 :]
    if n > 4:
        return MASK * (n - 4) + s[n - 4 :]
    return MASK * n


def mask_value(value, sensitivity="sad"):
    """Redact one value according to its sensitivity (see the module docstring)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: mask_value(v, sensitivity) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_value(v, sensitivity) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return b"*" * len(value)
    s = str(value)
    if sensitivity == "pan":
        return mask_pan(s)
    m = _TRACK.fullmatch(s)
    if m is not None:
        head = s[: m.start(1)]
        return MASK * len(head) + mask_pan(m.group(1)) + m.group(2) + MASK * len(m.group(3))
    return MASK * len(s)


def log_safe(fields: dict, masked: dict) -> dict:
    """A copy of `fields` with every field in `masked` ({num: sensitivity}) redacted."""
    out = {}
    for k, v in fields.items():
        level = masked.get(k)
        out[k] = v if level is None else mask_value(v, level)
    return out


class LogSafe(str):
    """Text already made log-safe by who built it (fluxrig.redact.log_view: its card numbers
    masked field by field, its timestamps and ids left as they are): a log line's masking
    leaves it as it is (mask_log_message)."""

    __slots__ = ()


def mask_log_message(msg, args) -> str:
    """`msg % args` (a log record's message) with its card numbers masked, except inside the
    LogSafe arguments. Each of those is replaced by a marker the digit rules cannot glue to
    (NUL, its index, NUL) while the line is masked, then put back; when a marker does not come
    back intact (a `%r` of it) the whole line is masked instead."""
    if not (isinstance(args, tuple) and any(type(a) is LogSafe for a in args)):
        text = str(msg) % args if args else str(msg)
        return mask_card_numbers(text)
    marks = tuple(f"\x00{i}\x00" if type(a) is LogSafe else a for i, a in enumerate(args))
    text = mask_card_numbers(str(msg) % marks)
    for i, a in enumerate(args):
        if type(a) is LogSafe:
            mark = f"\x00{i}\x00"
            if text.count(mark) != 1:
                return mask_card_numbers(str(msg) % tuple(str(a) if type(a) is LogSafe else a for a in args))
            text = text.replace(mark, a)
    return text
