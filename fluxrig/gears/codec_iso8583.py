"""`codec_iso8583`: ISO 8583 bytes <-> fields, driven by a spec (see fluxrig.iso8583).

Decode: `raw` becomes `data.iso8583.field.<N>` (composites as maps of subfields) and, for
fields the spec names, `data.<alias>`; meta gets `iso8583.mti`, `iso8583.mti_class` (first
two MTI digits), `iso8583.fields`, and the spec's `codec.spec_id`, `codec.spec_version`,
`codec.spec_hash`, `codec.protocol`. Encode: the MTI from `meta.iso8583.mti` (else field 0),
fields from their aliases first, then `iso8583.field.<N>`; the bytes go to `raw`, and meta
`log.mask` lists the sensitive fields encoded (as decoding does), so no logger shows that raw.
`direction: auto` decodes when `raw` is non-empty and encodes otherwise.

`on_error`: drop (count and log), reject (to `error` with `error.reason` decode_error or
encode_error and the field and offset in `error.detail`), kill (reject, and close the
originating connection through its I/O gear's kill switch). Values of sensitive fields
(PAN, track data: the spec's `sensitivity`) are masked in every log line: decoding lists
their data paths in meta `log.mask`, which every message logger honours (see
fluxrig.redact), and the codec's own errors name field and offset, never a value.

`validation` (default warn) runs the spec's rules (fluxrig.iso8583.rules: per-MTI mandatory /
optional / forbidden fields, `when` conditions, closed value sets, PAN format, named checks)
on every decoded message and every message about to be encoded: `off` skips them; `warn`
counts each violation, lists them in meta `iso8583.violations` (`rule:field,...`) and logs
(at most one line a second per gear, with how many were suppressed); `strict` also sends a
message with a reject-severity violation to `error` with `error.reason` validation_error and
the rule and field in `error.detail` (decoded fields kept, so an iso_responder wired to the
error port answers it 30, format error). `enforce` is accepted for `strict`.
"""

from __future__ import annotations

import logging
import os
import time

from ..errors import GearError
from ..iso8583 import Iso8583DecodeError, Iso8583EncodeError, SpecError, load_spec
from ..logs import TRACE, LogLimiter
from ..msg import FluxMsg, get_path, set_path
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..wire import meta as M

__all__ = ["resolve_spec", "fields_of", "CodecIso8583Gear"]

SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "string",
            "default": "moov:spec87ascii",
            "description": "spec file (YAML/JSON or a jPOS GenericPackager .xml, relative to the scenario) or a "
            "base: moov:spec87ascii, moov:spec87hex, moov:spec93ascii, moov:spec93binary, moov:spec2003binary",
        },
        "direction": {
            "type": "string",
            "enum": ["auto", "decode", "encode"],
            "default": "auto",
            "description": "auto decodes messages with raw bytes and encodes the others",
        },
        "on_error": {
            "type": "string",
            "enum": ["drop", "reject", "kill"],
            "default": "reject",
            "description": "drop: count and log; reject: to the error port; kill: reject and close the peer",
        },
        "aliases": {"type": "boolean", "default": True, "description": "also store decoded fields under their alias"},
        "validation": {
            "type": ["string", "boolean"],
            "enum": ["strict", "warn", "off", "enforce", False],
            "default": "warn",
            "description": "spec rules: strict sends violating messages to error; warn counts and logs; "
            "off (YAML's bare off, a boolean false, means off too)",
        },
    },
    "additionalProperties": False,
}


def resolve_spec(ref: str, scenario_dir: str):
    """A `moov:` base as is; a file path relative to the scenario's directory."""
    if ref.startswith("moov:") or os.path.isabs(ref):
        return load_spec(ref)
    return load_spec(os.path.join(scenario_dir, ref))


_NUM = {str(i): i for i in range(193)}
_STR = [str(i) for i in range(193)]


def fields_of(msg: FluxMsg, spec, aliases=None) -> dict:
    """The field dict to encode from a message: aliases first, then iso8583.field.N.

    `aliases` is [(root, number, alias)]; only aliases whose first segment is present in
    `data` are looked up, so a message carrying only iso8583.field.N costs nothing extra.
    """
    fields: dict = {}
    mti = msg.meta.get(M.ISO_MTI)
    table = get_path(msg.data, "iso8583.field")
    if isinstance(table, dict):
        for k, v in table.items():
            n = _NUM.get(k)
            if n is None:
                raise GearError("encode_error", f"iso8583.field.{k} is not a field number 0-192")
            fields[n] = v
    if aliases is None:
        aliases = [(a.split(".", 1)[0], n, a) for n, a in spec.aliases.items()]
    data = msg.data
    if len(data) > 1 or "iso8583" not in data:  # something besides iso8583.field: look for aliases
        for root, num, alias in aliases:
            if root in data:
                v = get_path(data, alias)
                if v is not None:
                    fields[num] = v
    if mti:
        fields[0] = mti
    fields.pop(1, None)  # bitmaps are built from the fields present
    return fields


@register
class CodecIso8583Gear(Gear):
    MANIFEST = Manifest(
        "codec_iso8583",
        "ISO 8583 decode/encode by spec; fields under iso8583.field.N and their aliases",
        category="codec",
        schema=SCHEMA,
        terminus="transparent",
    )

    @staticmethod
    def validate_config(config: dict):
        ref = config.get("spec", "")
        if ref.startswith("moov:"):
            try:
                load_spec(ref)
            except SpecError as exc:
                yield "spec", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        try:
            self.spec = resolve_spec(config["spec"], ctx.scenario_dir)
        except (SpecError, OSError) as exc:
            raise GearError("bad_spec", f"{name}: cannot load spec {config['spec']!r}: {exc}") from exc
        s = self.spec
        self._stamp = {
            M.CODEC_SPEC_ID: str(s.id),
            M.CODEC_SPEC_VERSION: str(s.version),
            M.CODEC_SPEC_HASH: str(s.hash),
            M.CODEC_PROTOCOL: str(getattr(s, "protocol", "iso8583") or "iso8583"),
        }
        self._aliases = list(s.aliases.items()) if config["aliases"] else []
        self._alias_roots = [(a.split(".", 1)[0], n, a) for n, a in s.aliases.items()]
        # data paths holding sensitive values, for `log.mask` (every logger masks them)
        self._mask_paths = {
            n: [f"iso8583.field.{n}"] + ([s.aliases[n]] if n in s.aliases and config["aliases"] else [])
            for n in s.masked
        }
        self._direction = config["direction"]
        self._on_error = config["on_error"]
        mode = config.get("validation", "warn")
        if mode is False:
            mode = "off"
        self._validation = "strict" if mode == "enforce" else mode
        self._rules = None if self._validation == "off" or s.rules.empty else s.rules
        self._limiter = LogLimiter(self.log)
        self.violations = 0
        self.rejected_invalid = 0
        self._log_at = 0.0
        self._log_suppressed = 0

    async def process(self, port: str, msg: FluxMsg) -> None:
        decode = self._direction == "decode" or (self._direction == "auto" and msg.raw)
        try:
            fields = self._decode(msg) if decode else self._encode(msg)
        except (Iso8583DecodeError, Iso8583EncodeError) as exc:
            self._failed(msg, "decode_error" if decode else "encode_error", exc)
            return await self._reject(msg, exc, decode)
        if self._rules is not None:
            if not decode and None in fields.values():
                fields = {k: v for k, v in fields.items() if v is not None}  # what the encoder skipped
            bad = self._rules.check(fields)
            if bad and await self._invalid(msg, bad, decode):
                return
        await self.emit("out", msg)

    async def _invalid(self, msg: FluxMsg, bad: list, decode: bool) -> bool:
        """Count and report violations; True when the message went to `error` (strict)."""
        self.violations += len(bad)
        msg.meta[M.ISO_VIOLATIONS] = ",".join(f"{v.rule}:{v.field if v.field is not None else '-'}" for v in bad)
        rejecting = [v for v in bad if v.severity == "reject"]
        strict = self._validation == "strict" and rejecting
        now = time.monotonic()
        if now - self._log_at >= 1.0:
            more = f" ({self._log_suppressed} similar lines suppressed)" if self._log_suppressed else ""
            self.log.warning(
                "%s: %s %s from %s breaks the spec: %s%s",
                self.name,
                "rejected" if strict else "passed",
                msg.meta.get(M.ISO_MTI, "?"),
                msg.meta.get(M.PEER_IP, "-"),
                "; ".join(str(v) for v in bad[:5]),
                more,
            )
            self._log_at = now
            self._log_suppressed = 0
        else:
            self._log_suppressed += 1
        if not strict:
            return False
        self.rejected_invalid += 1
        detail = "; ".join(str(v) for v in rejecting)
        if not decode:
            msg.raw = b""  # nothing invalid leaves through an encoder in strict mode
        await self.emit_error(msg, "validation_error", detail)
        return True

    def metrics(self) -> dict:
        m = super().metrics()
        m["violations"] = self.violations
        m["rejected_invalid"] = self.rejected_invalid
        return m

    def _decode(self, msg: FluxMsg) -> None:
        fields = self.spec.decode(msg.raw)
        table = {_STR[n]: v for n, v in fields.items() if n > 1}
        data = msg.data
        iso = data.get("iso8583")
        if isinstance(iso, dict):
            iso["field"] = table
        else:
            data["iso8583"] = {"field": table}
        for num, alias in self._aliases:
            v = fields.get(num)
            if v is not None:
                set_path(data, alias, v)
        mti = fields.get(0, "")
        meta = msg.meta
        meta.update(self._stamp)
        meta[M.ISO_MTI] = mti
        meta[M.ISO_MTI_CLASS] = mti[:2]
        meta[M.ISO_FIELDS] = ",".join(table)
        sensitive = [p for n, paths in self._mask_paths.items() if n in fields for p in paths]
        if sensitive:
            meta[M.LOG_MASK] = ",".join(sensitive)
        if self.log.isEnabledFor(TRACE):
            self.log.log(TRACE, "%s decoded %s", self.name, self.spec.log_safe(fields))
        return fields

    def _encode(self, msg: FluxMsg) -> dict:
        fields = fields_of(msg, self.spec, self._alias_roots)
        if 0 not in fields:
            raise Iso8583EncodeError("no MTI: set meta iso8583.mti or iso8583.field.0", field=0)
        msg.raw = self.spec.encode(fields)
        msg.meta.update(self._stamp)
        msg.meta[M.ISO_MTI] = str(fields[0])
        msg.meta[M.ISO_MTI_CLASS] = str(fields[0])[:2]
        # the encoded raw holds the PAN glued to the fields around it, and the message may
        # never have been decoded (a map built it): listed in log.mask, loggers elide raw
        sensitive = [p for n, paths in self._mask_paths.items() if n in fields for p in paths]
        if sensitive:
            msg.meta[M.LOG_MASK] = ",".join(sensitive)
        return fields

    def _failed(self, msg: FluxMsg, reason: str, exc: Exception) -> None:
        # the error text names field and offset, never the value: safe to log; a peer sending
        # garbage provokes it, so it is rate-limited per connection and per gear
        self._limiter.log_line(
            logging.WARNING,
            msg.meta.get(M.CONN_ID),
            "%s: %s from %s: %s",
            self.name,
            reason,
            msg.meta.get(M.PEER_IP, "-"),
            exc,
        )

    async def _reject(self, msg: FluxMsg, exc: Exception, decode: bool) -> None:
        reason = "decode_error" if decode else "encode_error"
        if self._on_error == "drop":
            self.counters.errors += 1
            self.counters.dropped += 1
            return
        if self._on_error == "kill":
            gear, conn = msg.meta.get(M.CONN_GEAR), msg.meta.get(M.CONN_ID)
            if gear and conn:
                self.ctx.control.publish(gear, {"cmd": M.CONN_CLOSE, "args": {"conn_id": conn, "reason": reason}})
        await self.emit_error(msg, reason, str(exc))
