"""`iso_responder`: an authorizer / host simulator answering decoded ISO 8583 requests.

A request (fields under `data.iso8583.field`, MTI in `meta.iso8583.mti`) becomes its response:
MTI with the function digit raised (0100 -> 0110, 0200 -> 0210, 0220 -> 0230, 0800 -> 0810),
the fields named by `echo_fields` copied, DE 39 from the first matching rule (default
`default_code`, "00"), DE 38 an authorization code when approved. Network management (08xx)
is answered 39=00 with DE 7, 11, 32, 41 and 70 echoed when present. The reply keeps the request's metadata
(conn.id, headers) so it goes back to the same connection, and leaves `raw` empty so a
following codec encodes it.

Reversals (04xx) are answered 0410/0430: 39=00 when the ledger holds the original named by DE 90
(original MTI, STAN; with DE 41 when present), else 39=25 ("unable to locate original").
The ledger counts what was approved and what was reversed (`metrics()`: ledger_approved,
ledger_reversed, reversals_without_original), so a test or an operator can check that nothing
approved stays unreversed when its approval never reached the acquirer.

`faults` make it a bad host on purpose: `drop` (share of requests approved but never
answered), `late` (share answered after `late_by`), `drop_reversals` (share of reversal attempts
not answered, so the switch repeats them); `seed` makes the choice reproducible.

A request that a codec with `validation: strict` sent to its error port (meta `error.reason`
validation_error; wire the codec's `error` to the responder's `in`) is answered with
`format_error_code` (default "30", format error) and no authorization code, whatever the rules.

Rules are ordered; each is a condition on one field plus the code to answer:
  - {field: 4, gt: 100000, code: "51"}       # amount above 1000.00
  - {field: 2, prefix: "5", code: "05"}      # PAN prefix
  - {field: 3, prefix: "31", code: "00"}     # processing code
"""

from __future__ import annotations

import asyncio
import itertools
import random

from ..conditions import CONDITION_PROPERTIES, compile_condition
from ..durations import parse_duration
from ..errors import GearError
from ..ids import uuid7
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..wire import meta as M

__all__ = ["response_mti", "IsoResponderGear"]

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
        "echo_fields": {
            "type": "array",
            "items": {"type": "integer", "minimum": 2, "maximum": 192},
            "default": DEFAULT_ECHO,
            "description": "request fields copied into the response",
        },
        "rules": {
            "type": "array",
            "items": RULE_SCHEMA,
            "default": [],
            "description": "ordered; the first match sets DE 39",
        },
        "default_code": {
            "type": "string",
            "pattern": "^[0-9A-Z]{2}$",
            "default": "00",
            "description": "DE 39 when no rule matches",
        },
        "format_error_code": {
            "type": "string",
            "pattern": "^[0-9A-Z]{2}$",
            "default": "30",
            "description": "DE 39 for a request that failed strict spec validation",
        },
        "approved_codes": {
            "type": "array",
            "items": {"type": "string"},
            "default": ["00", "08", "10", "11"],
            "description": "codes that get an authorization code in DE 38",
        },
        "faults": {
            "type": "object",
            "properties": {
                "drop": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
                "late": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
                "late_by": {"type": "string", "format": "duration", "default": "2s"},
                "drop_reversals": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
                "seed": {"type": "integer", "default": 0},
            },
            "additionalProperties": False,
            "default": {},
            "description": "misbehave on purpose: shares of requests dropped or answered late",
        },
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
        self._format_error = config["format_error_code"]
        self._auth = itertools.count(1)
        faults = config.get("faults") or {}
        self._drop = float(faults.get("drop", 0))
        self._late = float(faults.get("late", 0))
        self._late_by = parse_duration(faults.get("late_by", "2s"))
        self._drop_rev = float(faults.get("drop_reversals", 0))
        self._rng = random.Random(faults.get("seed", 0))
        self._pending: set = set()
        # (original MTI class, STAN, terminal) -> [approved, reversed]; bounded by what a test
        # or a demo sends (a simulator, not a host: it keeps everything it approved).
        self.ledger: dict[tuple, list] = {}
        self.ledger_stats = {"ledger_approved": 0, "ledger_reversed": 0, "reversals_without_original": 0}

    async def process(self, port: str, msg: FluxMsg) -> None:
        iso = msg.data.get("iso8583")
        req = iso.get("field") if isinstance(iso, dict) else None
        mti = msg.meta.get(M.ISO_MTI) or (req or {}).get("0")
        if not isinstance(req, dict) or not mti:
            raise GearError("not_decoded", "no iso8583 fields: put a codec_iso8583 before the responder")
        rmti = response_mti(mti)
        delay = 0.0
        invalid = msg.meta.get(M.ERROR_REASON) == "validation_error"
        for key in (M.ERROR_REASON, M.ERROR_GEAR, M.ERROR_DETAIL, M.ISO_VIOLATIONS):
            msg.meta.pop(key, None)
        if mti[1] == "8":  # network management: echo test, sign-on
            out = {k: req[k] for k in NETWORK_ECHO if k in req}
            out["39"] = self._format_error if invalid else "00"
        elif mti[1] == "4":  # reversal family
            if self._drop_rev and self._rng.random() < self._drop_rev:
                return
            out = {k: req[k] for k in self._echo if k in req}
            out["39"] = self._reverse(req)
        else:
            out = {k: req[k] for k in self._echo if k in req}
            if invalid:
                code = self._format_error  # never approved: the request broke the spec
            else:
                code = self._default
                for cond, rcode in self._rules:
                    if cond(msg, req):
                        code = rcode
                        break
            out["39"] = code
            if code in self._approved and not invalid:
                out["38"] = f"{next(self._auth) % 1_000_000:06d}"
            self._record(mti, req, code in self._approved)
            roll = self._rng.random() if (self._drop or self._late) else 1.0
            if roll < self._drop:
                return
            if roll < self._drop + self._late:
                delay = self._late_by
        # The request becomes its reply in place: same metadata (conn.id, headers), new id,
        # ref_id pointing at the request, no raw bytes so the next codec encodes it.
        msg.ref_id = msg.id
        msg.id = uuid7()
        msg.data = {"iso8583": {"field": out}}
        msg.raw = b""
        msg.meta[M.ISO_MTI] = rmti
        msg.meta[M.ISO_MTI_CLASS] = rmti[:2]
        reply = msg
        if delay:
            task = asyncio.get_running_loop().create_task(self._later(delay, reply))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        await self.emit("out", reply)

    async def _later(self, delay: float, reply: FluxMsg) -> None:
        await asyncio.sleep(delay)
        try:
            await self.emit("out", reply)
        except Exception as exc:  # noqa: BLE001 (the connection may be gone: that is the point)
            self.log.info("%s: late reply not delivered: %s", self.name, exc)

    @staticmethod
    def _ledger_key(mti: str, stan, terminal) -> tuple:
        return (
            mti[:2] + str(int(mti[2]) & ~1) + "0" if len(mti) == 4 and mti.isdigit() else mti,
            str(stan),
            str(terminal or ""),
        )

    def _record(self, mti: str, req: dict, approved: bool) -> None:
        self.ledger[self._ledger_key(mti, req.get("11"), req.get("41"))] = [approved, False]
        if approved:
            self.ledger_stats["ledger_approved"] += 1

    def _reverse(self, req: dict) -> str:
        de90 = str(req.get("90") or "")
        entry = self.ledger.get(self._ledger_key(de90[:4], de90[4:10], req.get("41"))) if len(de90) >= 10 else None
        if entry is None:
            self.ledger_stats["reversals_without_original"] += 1
            return "25"
        if entry[0] and not entry[1]:
            self.ledger_stats["ledger_reversed"] += 1
        entry[1] = True
        return "00"

    def approved_unreversed(self) -> list[tuple]:
        return [k for k, (approved, reversed_) in self.ledger.items() if approved and not reversed_]

    async def stop(self) -> None:
        for task in list(self._pending):
            task.cancel()

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.ledger_stats)
        return m
