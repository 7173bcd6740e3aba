"""Typed errors of the ISO 8583 codec and spec loader (defined once, shared by both backends).

Decoding errors are the peer's fault (`RemoteProtocolError`); encoding errors are ours
(`LocalProtocolError`); a spec that cannot be loaded is a configuration problem
(`ConfigError`). Every codec error names the field number (`field`, 0 = MTI, 1 = bitmap),
the subfield inside a composite when there is one (`subfield`: TLV tag hex or positional
key), the byte offset in the message (`offset`: where the failing element starts in the
bytes being decoded, or where it would have started in the bytes being built), and a short
machine-friendly `reason` (e.g. ``"short"``, ``"length"``, ``"charset"``, ``"unknown_field"``).
The compiled twin imports these classes from here, so both backends raise the same types.
"""

from __future__ import annotations

from fluxrig.errors import ConfigError, LocalProtocolError, RemoteProtocolError

__all__ = ["Iso8583DecodeError", "Iso8583EncodeError", "SpecError"]


def _where(field, subfield) -> str:
    if field is None:
        return "message"
    if subfield is None:
        return f"field {field}"
    return f"field {field}.{subfield}"


class Iso8583DecodeError(RemoteProtocolError):
    """Bytes from a peer that do not parse under the spec.

    Attributes: `field` (int or None), `subfield` (str or None), `offset` (int), `reason` (str),
    `detail` (the message without the location), `partial` (dict of the fields decoded before
    the failure, set by Codec.decode).
    """

    def __init__(self, message: str, field=None, offset=None, reason: str = "invalid", subfield=None):
        self.field = field
        self.subfield = subfield
        self.reason = reason
        self.detail = message
        self.partial = None
        super().__init__(f"ISO 8583 decode, {_where(field, subfield)}: {message}", offset)


class Iso8583EncodeError(LocalProtocolError):
    """Field values that cannot be encoded under the spec (wrong type, length, charset...).

    Attributes: `field` (int or None), `subfield` (str or None), `offset` (int: bytes already
    built before the failing field), `reason` (str).
    """

    def __init__(self, message: str, field=None, offset=None, reason: str = "invalid", subfield=None):
        self.field = field
        self.subfield = subfield
        self.reason = reason
        self.detail = message
        super().__init__(f"ISO 8583 encode, {_where(field, subfield)}: {message}", offset)


class SpecError(ConfigError):
    """A message spec failed to load; `problems` lists every problem found (location: text).

    `key` is the dotted location of the first problem (e.g. ``spec.wire.fields.55.prefix``),
    `source` the file or base name the spec came from.
    """

    def __init__(self, problems, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        head = f"ISO 8583 spec {source} is invalid" if source else "ISO 8583 spec is invalid"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        first = self.problems[0].split(":", 1)[0] if self.problems else None
        ConfigError.__init__(self, f"{head} ({len(self.problems)} problem(s)):\n{lines}")
        self.key = first
