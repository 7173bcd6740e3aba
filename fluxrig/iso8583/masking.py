"""Log-safe views of ISO 8583 fields: PAN masking and sensitivity-driven redaction.

Job: never let a PAN, track data or a PIN block reach a log line. `mask_pan` keeps the first
six and last four digits (PCI DSS display rule) of a 13-19 digit PAN and only the last four of
a shorter one; `log_safe(fields, masked)` returns a copy of a decoded message in which every
field named in `masked` ({field number: sensitivity}) is redacted: `pan` fields through
mask_pan, anything else that looks like track data keeps its masked PAN and loses the rest,
other strings and bytes are replaced by '*' of the same length, composites are redacted leaf
by leaf. The input is never modified.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "mask_pan", "mask_value", "log_safe", "mask_card_numbers", "luhn_valid"]

MASK = "*"
_TRACK = re.compile(r"%?[A-Z]?([0-9]{6,19})([=D^])(.*)", re.S)
_CARD_RUN = re.compile(r"(?<![0-9])[0-9]{13,19}(?![0-9])")
# Each digit's value once doubled and its digits summed (Luhn), as the ASCII digit itself.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of an ASCII digit string."""
    if not digits or not (digits.isdigit() and digits.isascii()):
        return False
    rev = digits[::-1].encode("ascii")
    # byte sums: every digit counts as its ASCII code, 48 too many per digit
    return (sum(rev[0::2]) + sum(rev[1::2].translate(_DOUBLED)) - 48 * len(rev)) % 10 == 0


def _mask_run(m):
    run = m.group(0)
    return mask_pan(run) if luhn_valid(run) else run


def mask_card_numbers(text: str) -> str:
    """`text` with every Luhn-valid run of 13-19 digits (a card number) masked by mask_pan.
    Digits that are part of a longer run are left alone (a timestamp, an amount field)."""
    if len(text) < 13:
        return text
    return _CARD_RUN.sub(_mask_run, text)


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
