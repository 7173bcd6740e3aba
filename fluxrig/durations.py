"""Strict duration parsing: "500ms", "5s", "1m30s", "2h". A bare number is refused.

Go-style units (ns, us, ms, s, m, h) so fluxrig.toml files read like the Go original's.
"""

from __future__ import annotations

import re

__all__ = ["parse_duration", "format_duration"]

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds for a duration string; ValueError naming the text when it does not parse."""
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string like '5s' or '250ms', got {text!r}")
    s = text.strip()
    if not s:
        raise ValueError("duration is empty; write e.g. '5s' or '250ms'")
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r}; use a number with a unit (ns, us, ms, s, m, h), e.g. '1m30s'")
    return total


def format_duration(seconds: float) -> str:
    """Shortest readable form: 0.25 -> '250ms', 90 -> '1m30s'."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds >= 60 and seconds == int(seconds):
        m, s = divmod(int(seconds), 60)
        return f"{m}m{s}s" if s else f"{m}m"
    return f"{seconds:g}s"
