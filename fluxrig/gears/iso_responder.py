"""`iso_responder`: an authorizer / host simulator answering decoded ISO 8583 requests.

A request (fields under `data.iso8583.field`, MTI in `meta.iso8583.mti`) becomes its response:
MTI with the function digit raised (0100 -> 0110, 0200 -> 0210, 0220 -> 0230, 0800 -> 0810),
the fields named by `echo_fields` copied, DE 39 from the first matching rule (default
`default_code`, "00"), DE 38 an authorization code when approved. Network management (08xx)
is answered 39=00 with DE 7, 11, 32, 41 and 70 echoed when present. The reply keeps the request's metadata
(conn.id, headers) so it goes back to the same connection, and leaves `raw` empty so a
following codec encodes it.

Rules are ordered; each is a condition on one field plus the code to answer:
  - {field: 4, gt: 100000, code: "51"}       # amount above 1000.00
  - {field: 2, prefix: "5", code: "05"}      # PAN prefix
  - {field: 3, prefix: "31", code: "00"}     # processing code
"""

from __future__ import annotations

import itertools

from ..conditions import CONDITION_PROPERTIES, compile_condition
from ..errors import GearError
from ..ids import uuid7
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register

DEFAULT_ECHO = [2, 3, 4, 7, 11, 12, 13, 32, 37, 41, 42, 49]
NETWORK_ECHO = ["7", "11", "32", "41", "70"]

RULE_SCHEMA = {
    "type": "object",
    "properties": {
        **{k: v for k, v in CONDITION_PROPERTIES.items() if k != "field"},
        "field": {"type": ["integer", "string"], "description": "field number (or a path)"},
        "code": {"type": "string", "pattern": "^[0-9A-Z]{2}$", "description": "DE 39 to answer"},
    },
    "required": ["field", "code"],
    "additionalProperties": False,
}

SCHEMA = {
    "type": "object",
    "properties": {
        "echo_fields": {"type": "array", "items": {"type": "integer", "minimum": 2, "maximum": 192},
                        "default": DEFAULT_ECHO, "description": "request fields copied into the response"},
        "rules": {"type": "array", "items": RULE_SCHEMA, "default": [],
                  "description": "ordered; the first match sets DE 39"},
        "default_code": {"type": "string", "pattern": "^[0-9A-Z]{2}$", "default": "00",
                         "description": "DE 39 when no rule matches"},
        "approved_codes": {"type": "array", "items": {"type": "string"}, "default": ["00", "08", "10", "11"],
                           "description": "codes that get an authorization code in DE 38"},
    },
    "additionalProperties": False,
}


def response_mti(mti: str) -> str:
    """The response MTI: the function digit (third) goes from request/advice to its response."""
    if len(mti) != 4 or not mti.isdigit():
        raise GearError("bad_mti", f"MTI {mti!r} is not four digits")
    function = int(mti[2])
    if function % 2:
        raise GearError("not_a_request", f"MTI {mti} is already a response")
    return mti[:2] + str(function + 1) + mti[3]


def _rule(rule: dict):
    """A predicate over (message, request fields): field numbers read the decoded request
    directly, other fields are message paths (meta.error.reason, ...)."""
    field = rule.get("field")
    if isinstance(field, int) or str(field).isdigit():
        key = str(field)
        pred = compile_condition(rule, read=lambda req: req.get(key))
        return lambda msg, req: pred(req)
    pred = compile_condition(rule, str(field))
    return lambda msg, req: pred(msg)


@register
class IsoResponderGear(Gear):
    MANIFEST = Manifest(
        "iso_responder",
        "Authorizer/host simulator: answers ISO 8583 requests by rules (DE 39/38), 0800 echo tests",
        category="logic",
        schema=SCHEMA,
        terminus="transparent",
    )

    @staticmethod
    def validate_config(config: dict):
        for i, rule in enumerate(config.get("rules") or []):
            try:
                _rule(rule)
            except (ValueError, KeyError) as exc:
                yield f"rules[{i}]", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self._rules = [(_rule(r), r["code"]) for r in config["rules"]]
        self._echo = [str(n) for n in config["echo_fields"]]
        self._approved = frozenset(config["approved_codes"])
        self._default = config["default_code"]
        self._auth = itertools.count(1)

    async def process(self, port: str, msg: FluxMsg) -> None:
        iso = msg.data.get("iso8583")
        req = iso.get("field") if isinstance(iso, dict) else None
        mti = msg.meta.get("iso8583.mti") or (req or {}).get("0")
        if not isinstance(req, dict) or not mti:
            raise GearError("not_decoded", "no iso8583 fields: put a codec_iso8583 before the responder")
        rmti = response_mti(mti)
        if mti[1] == "8":  # network management: echo test, sign-on
            out = {k: req[k] for k in NETWORK_ECHO if k in req}
            out["39"] = "00"
        else:
            out = {k: req[k] for k in self._echo if k in req}
            code = self._default
            for cond, rcode in self._rules:
                if cond(msg, req):
                    code = rcode
                    break
            out["39"] = code
            if code in self._approved:
                out["38"] = "%06d" % (next(self._auth) % 1_000_000)
        # The request becomes its reply in place: same metadata (conn.id, headers), new id,
        # ref_id pointing at the request, no raw bytes so the next codec encodes it.
        msg.ref_id = msg.id
        msg.id = uuid7()
        msg.data = {"iso8583": {"field": out}}
        msg.raw = b""
        msg.meta["iso8583.mti"] = rmti
        msg.meta["iso8583.mti_class"] = rmti[:2]
        reply = msg
        await self.emit("out", reply)
