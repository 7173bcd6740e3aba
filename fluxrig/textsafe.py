"""Text from elsewhere, made safe to print on an operator's terminal or in a log line.

Job. Log bodies, rack names, reasons, hosts and labels reach the operator from Racks (and from
whoever holds a bootstrap token). Printed raw, an ESC sequence in one of them can rewrite the
screen, retitle the terminal, hide the lines above it or (on some terminals) answer back into
the shell; a newline forges a log line of its own; a bidirectional override makes text read
differently from what it is. `escape_text` turns every such character into a visible escape:

  - C0 controls (U+0000-U+001F) but the ones asked to be kept, DEL, C1 controls
    (U+0080-U+009F): `\\n`, `\\r`, `\\t`, `\\e` (ESC), else `\\xNN`;
  - bidirectional controls (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069), line and
    paragraph separators (U+2028, U+2029), and lone surrogates: `\\uNNNN`;
  - a backslash is left alone (escaping it too would double every Windows path in a log).

`SafeStream(stream)` writes through `escape_text(..., keep="\\n")`: our own newlines pass, every
other control character anyone managed to get into the text is shown escaped. The CLI installs
it around the commands that print what the Mixer relays (cli/mixer_api.run_api_command);
single fields that must stay on one line (a log body, a table cell) are escaped with newlines
too. `EscapingFormatter` does the same for the Mixer's own log lines (the message, not the
traceback that logging appends).
"""

from __future__ import annotations

import logging
import re

__all__ = ["escape_text", "SafeStream", "EscapingFormatter"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(m: re.Match) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text, keep: str = "") -> str:
    """`text` (anything: str() is applied) with every unsafe character shown as an escape;
    the characters in `keep` (e.g. "\\n") pass unchanged."""
    s = text if isinstance(text, str) else str(text)
    if not _UNSAFE.search(s):
        return s
    if keep:
        return _UNSAFE.sub(lambda m: m.group() if m.group() in keep else _escape_char(m), s)
    return _UNSAFE.sub(_escape_char, s)


class SafeStream:
    """A text stream that escapes what it is given (newlines kept); everything else delegates."""

    def __init__(self, stream, keep: str = "\n"):
        self._stream = stream
        self._keep = keep

    def write(self, text: str) -> int:
        self._stream.write(escape_text(text, self._keep))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class EscapingFormatter(logging.Formatter):
    """logging.Formatter whose message part is escaped (newlines too: one record, one line);
    a traceback appended by logging keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_text(super().formatMessage(record))
