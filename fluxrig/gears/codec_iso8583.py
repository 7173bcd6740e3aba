"""`codec_iso8583`: ISO 8583 bytes <-> fields, driven by a spec (see fluxrig.iso8583).

Decode: `raw` becomes `data.iso8583.field.<N>` (composites as maps of subfields) and, for
fields the spec names, `data.<alias>`; meta gets `iso8583.mti`, `iso8583.mti_class` (first
two MTI digits), `iso8583.fields`, and the spec's `codec.spec_id`, `codec.spec_version`,
`codec.spec_hash`, `codec.protocol`. Encode: the MTI from `meta.iso8583.mti` (else field 0),
fields from their aliases first, then `iso8583.field.<N>`; the bytes go to `raw`.
`direction: auto` decodes when `raw` is non-empty and encodes otherwise.

`on_error`: drop (count and log), reject (to `error` with `error.reason` decode_error or
encode_error and the field and offset in `error.detail`), kill (reject, and close the
originating connection through its I/O gear's kill switch). Values of sensitive fields
(PAN, track data: the spec's `sensitivity`) are masked in every log line: decoding lists
their data paths in meta `log.mask`, which every message logger honours (see
fluxrig.redact), and the codec's own errors name field and offset, never a value.
"""

from __future__ import annotations

import logging
import os

from ..errors import GearError
from ..iso8583 import Iso8583DecodeError, Iso8583EncodeError, SpecError, load_spec
from ..logs import TRACE
from ..msg import FluxMsg, get_path, set_path
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register

SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {"type": "string", "default": "moov:spec87ascii",
                 "description": "spec file (YAML/JSON, relative to the scenario) or a base: moov:spec87ascii, moov:spec87hex"},
        "direction": {"type": "string", "enum": ["auto", "decode", "encode"], "default": "auto",
                      "description": "auto decodes messages with raw bytes and encodes the others"},
        "on_error": {"type": "string", "enum": ["drop", "reject", "kill"], "default": "reject",
                     "description": "drop: count and log; reject: to the error port; kill: reject and close the peer"},
        "aliases": {"type": "boolean", "default": True, "description": "also store decoded fields under their alias"},
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
    mti = msg.meta.get("iso8583.mti")
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
            "codec.spec_id": str(s.id),
            "codec.spec_version": str(s.version),
            "codec.spec_hash": str(s.hash),
            "codec.protocol": str(getattr(s, "protocol", "iso8583") or "iso8583"),
        }
        self._aliases = list(s.aliases.items()) if config["aliases"] else []
        self._alias_roots = [(a.split(".", 1)[0], n, a) for n, a in s.aliases.items()]
        # data paths holding sensitive values, for `log.mask` (every logger masks them)
        self._mask_paths = {n: [f"iso8583.field.{n}"] + ([s.aliases[n]] if n in s.aliases and config["aliases"] else [])
                            for n in s.masked}
        self._direction = config["direction"]
        self._on_error = config["on_error"]

    async def process(self, port: str, msg: FluxMsg) -> None:
        decode = self._direction == "decode" or (self._direction == "auto" and msg.raw)
        try:
            self._decode(msg) if decode else self._encode(msg)
        except (Iso8583DecodeError, Iso8583EncodeError) as exc:
            self._failed(msg, "decode_error" if decode else "encode_error", exc)
            return await self._reject(msg, exc, decode)
        await self.emit("out", msg)

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
        meta["iso8583.mti"] = mti
        meta["iso8583.mti_class"] = mti[:2]
        meta["iso8583.fields"] = ",".join(table)
        sensitive = [p for n, paths in self._mask_paths.items() if n in fields for p in paths]
        if sensitive:
            meta["log.mask"] = ",".join(sensitive)
        if self.log.isEnabledFor(TRACE):
            self.log.log(TRACE, "%s decoded %s", self.name, self.spec.log_safe(fields))

    def _encode(self, msg: FluxMsg) -> None:
        fields = fields_of(msg, self.spec, self._alias_roots)
        if 0 not in fields:
            raise Iso8583EncodeError("no MTI: set meta iso8583.mti or iso8583.field.0", field=0)
        msg.raw = self.spec.encode(fields)
        msg.meta.update(self._stamp)
        msg.meta["iso8583.mti"] = str(fields[0])
        msg.meta["iso8583.mti_class"] = str(fields[0])[:2]

    def _failed(self, msg: FluxMsg, reason: str, exc: Exception) -> None:
        if self.log.isEnabledFor(logging.WARNING):
            # the error text names field and offset, never the value: safe to log
            self.log.warning("%s: %s from %s: %s", self.name, reason, msg.meta.get("peer.ip", "-"), exc)

    async def _reject(self, msg: FluxMsg, exc: Exception, decode: bool) -> None:
        reason = "decode_error" if decode else "encode_error"
        if self._on_error == "drop":
            self.counters.errors += 1
            self.counters.dropped += 1
            return
        if self._on_error == "kill":
            gear, conn = msg.meta.get("conn.gear"), msg.meta.get("conn.id")
            if gear and conn:
                self.ctx.control.publish(gear, {"cmd": "conn.close", "args": {"conn_id": conn, "reason": reason}})
        await self.emit_error(msg, reason, str(exc))
