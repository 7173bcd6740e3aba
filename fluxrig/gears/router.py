"""`router`: ordered match rules on message fields -> `out_<name>` ports.

Config:
  rules:            ordered; the first rule whose conditions all hold wins
    - name: visa    # the message leaves on out_visa
      match:        # one condition or a list (all must hold)
        field: data.iso8583.field.2
        prefix: "4"          # or equals / not_equals / in / regex / exists / gt / lt
  default: other    # optional: unmatched messages leave on out_other
Without a default, an unmatched message goes to `error` with error.reason=no_route.
"""

from __future__ import annotations

import re

from ..conditions import compile_all
from ..errors import GearError
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..wire import meta as M

__all__ = ["RouterGear"]

SCHEMA = {
    "type": "object",
    "properties": {
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "port suffix: out_<name>"},
                    "match": {
                        "type": ["object", "array"],
                        "description": "condition {field, equals|not_equals|prefix|in|regex|exists|gt|lt} or a list (all hold)",
                    },
                },
                "required": ["name", "match"],
                "additionalProperties": False,
            },
            "description": "ordered rules, first match wins",
        },
        "default": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "port suffix for unmatched messages"},
    },
    "required": ["rules"],
    "additionalProperties": False,
}


def _outputs(config: dict) -> list[str]:
    names = [f"out_{r['name']}" for r in config.get("rules") or [] if isinstance(r, dict) and "name" in r]
    if config.get("default"):
        names.append(f"out_{config['default']}")
    return names


@register
class RouterGear(Gear):
    MANIFEST = Manifest(
        "router",
        "Ordered match rules on fields choose one out_<name> port; no match goes to error",
        category="logic",
        outputs=(),
        schema=SCHEMA,
        dynamic_outputs=_outputs,
    )

    @staticmethod
    def validate_config(config: dict):
        seen = set()
        for i, rule in enumerate(config.get("rules") or []):
            name = rule.get("name")
            if name in seen:
                yield f"rules[{i}].name", f"duplicate rule name {name!r}"
            seen.add(name)
            conds = rule.get("match")
            conds = conds if isinstance(conds, list) else [conds]
            for j, c in enumerate(conds):
                try:
                    if not isinstance(c, dict) or "field" not in c:
                        raise ValueError("a condition is a map with field and one test")
                    compile_all(c)
                except (ValueError, re.error) as exc:
                    yield f"rules[{i}].match[{j}]", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self._rules = []
        for rule in config["rules"]:
            self._rules.append((f"out_{rule['name']}", compile_all(rule["match"])))
        self._default = f"out_{config['default']}" if config.get("default") else None

    async def process(self, port: str, msg: FluxMsg) -> None:
        for out, conds in self._rules:
            if all(c(msg) for c in conds):
                msg.meta[M.ROUTER_RULE] = out[4:]
                await self.emit(out, msg)
                return
        if self._default:
            await self.emit(self._default, msg)
            return
        raise GearError("no_route", "no rule matched and no default is configured")
