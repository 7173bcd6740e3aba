"""Gear config validation against a small JSON-Schema subset, with defaults applied.

Supported keywords: type (object, string, integer, number, boolean, array, or a list of
them), properties, required, additionalProperties (false or a schema), items, enum,
minimum, maximum, default, description, pattern. `"format": "duration"` strings must parse
as durations. Enough to state every gear's config precisely and to print it in
`fluxrig gears doc`; no dependency on a JSON-Schema library in the Rack.

`check(schema, value, where)` returns every problem as (location, message) pairs;
`with_defaults(schema, config)` returns a copy with defaults filled in.
"""

from __future__ import annotations

import copy
import re

from ..durations import parse_duration

__all__ = ["check", "with_defaults", "describe"]

_PY = {
    "object": dict,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "null": type(None),
}


def _type_ok(kind: str, value) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _PY[kind])


def check(schema: dict, value, where: str) -> list[tuple[str, str]]:
    """Every way `value` breaks `schema`, as (location, message)."""
    problems: list[tuple[str, str]] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds_l = kinds if isinstance(kinds, list) else [kinds]
        if not any(_type_ok(k, value) for k in kinds_l):
            problems.append((where, f"expected {' or '.join(kinds_l)}, got {type(value).__name__} {value!r}"))
            return problems
    if "enum" in schema and value not in schema["enum"]:
        problems.append((where, f"{value!r} is not one of {', '.join(map(repr, schema['enum']))}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append((where, f"{value} is below the minimum {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            problems.append((where, f"{value} is above the maximum {schema['maximum']}"))
    if isinstance(value, str):
        if schema.get("format") == "duration":
            try:
                parse_duration(value)
            except ValueError as exc:
                problems.append((where, str(exc)))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append((where, f"{value!r} does not match {schema['pattern']}"))
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", ()):
            if req not in value:
                problems.append((f"{where}.{req}", "required key is missing"))
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            loc = f"{where}.{key}"
            if key in props:
                problems.extend(check(props[key], sub, loc))
            elif extra is False:
                known = ", ".join(sorted(props)) or "none"
                problems.append((loc, f"unknown key (known keys: {known})"))
            elif isinstance(extra, dict):
                problems.extend(check(extra, sub, loc))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems.extend(check(schema["items"], item, f"{where}[{i}]"))
    return problems


def with_defaults(schema: dict, config: dict | None) -> dict:
    """A deep copy of `config` with every missing top-level default filled in."""
    out = copy.deepcopy(config) if config else {}
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    return out


def describe(schema: dict) -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, description) for documentation."""
    rows = []
    required = set(schema.get("required", ()))
    for key, sub in schema.get("properties", {}).items():
        kind = sub.get("type", "any")
        kind = "|".join(kind) if isinstance(kind, list) else kind
        if "enum" in sub:
            kind += " (" + "|".join(map(str, sub["enum"])) + ")"
        default = "required" if key in required else repr(sub["default"]) if "default" in sub else "-"
        rows.append((key, kind, default, sub.get("description", "")))
    return rows
