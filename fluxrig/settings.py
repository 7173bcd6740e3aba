"""The configuration engine shared by the Rack (`fluxrig.toml`) and the Mixer
(`fluxrig-mixer.toml`): a schema of typed keys, three layers (defaults < TOML file <
environment), strict coercion, and a commented example file.

A schema maps section -> key -> (type, default, one-line doc, choices or None); types are
"str", "int", "float", "bool" and "duration" (a string with a unit, stored as seconds). Any
unknown key, wrong type or bad duration raises ConfigError naming the dotted key.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from .durations import parse_duration
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DUR", "STR", "INT", "BOOL", "FLOAT", "coerce", "defaults", "read_toml", "read_env", "example_toml",
           "Settings"]

DUR, STR, INT, BOOL, FLOAT = "duration", "str", "int", "bool", "float"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def coerce(schema: dict, section: str, key: str, value, from_env: bool):
    """`value` as the key's type; environment values arrive as text and are parsed."""
    kind, _default, _doc, choices = schema[section][key]
    where = f"{section}.{key}"
    if kind == DUR:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_env:
            raise ConfigError(f'durations need a unit, write e.g. "{value}s" (got {value!r})', where)
        try:
            value = parse_duration(str(value))
        except ValueError as exc:
            raise ConfigError(str(exc), where) from None
    elif kind == BOOL:
        if isinstance(value, str) and from_env:
            low = value.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ConfigError(f"expected true/false, got {value!r}", where)
            value = low in _TRUE
        elif not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}", where)
    elif kind == INT:
        if isinstance(value, str) and from_env:
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"expected an integer, got {value!r}", where) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", where)
        if value < 0:
            raise ConfigError(f"must not be negative, got {value}", where)
    elif kind == FLOAT:
        try:
            value = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            value = None
        if value is None or value < 0:
            raise ConfigError("expected a non-negative number", where)
    elif not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", where)
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(map(str, choices))}", where)
    return value


def defaults(schema: dict) -> dict[str, dict]:
    return {s: {k: (coerce(schema, s, k, spec[1], True) if spec[0] == DUR else spec[1]) for k, spec in keys.items()}
            for s, keys in schema.items()}


def read_toml(schema: dict, path: str, values: dict) -> None:
    """Apply the TOML file at `path` over `values`."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for section, body in doc.items():
        if section not in schema:
            raise ConfigError(f"unknown section [{section}] in {path}; known: {', '.join(schema)}", section)
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table", section)
        for key, value in body.items():
            if key not in schema[section]:
                raise ConfigError(f"unknown key in {path}; known keys of [{section}]: {', '.join(schema[section])}",
                                  f"{section}.{key}")
            values[section][key] = coerce(schema, section, key, value, from_env=False)


def read_env(schema: dict, env, prefix: str, values: dict, *, unknown_sections_are_errors: bool,
             aliases: dict[str, str] | None = None) -> None:
    """Apply `<prefix><SECTION>_<KEY>` variables; `aliases` maps a bare name (after the prefix,
    lower-case) to a dotted key. Variables naming no section are errors or ignored, as asked."""
    by_length = sorted(schema, key=len, reverse=True)
    for name, value in env.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):].lower()
        if aliases and rest in aliases:
            section, _, key = aliases[rest].partition(".")
        else:
            section = next((s for s in by_length if rest.startswith(s + "_")), None)
            if section is None:
                if unknown_sections_are_errors:
                    raise ConfigError(f"environment variable {name} names no section ({', '.join(schema)})", rest)
                continue
            key = rest[len(section) + 1:]
        if key not in schema[section]:
            raise ConfigError(f"environment variable {name} names an unknown key", f"{section}.{key}")
        values[section][key] = coerce(schema, section, key, value, from_env=True)


def example_toml(schema: dict, header: str) -> str:
    """A commented TOML file with every key at its default."""
    lines = [header, ""]
    for section, keys in schema.items():
        lines.append(f"[{section}]")
        for key, (kind, default, doc, choices) in keys.items():
            extra = f" ({' | '.join(map(str, choices))})" if choices else ""
            lines.append(f"# {doc}{extra}")
            if kind == BOOL:
                rendered = "true" if default else "false"
            elif kind in (INT, FLOAT):
                rendered = str(default)
            else:
                rendered = json.dumps(str(default))
            lines.append(f"{key} = {rendered}")
        lines.append("")
    return "\n".join(lines)


class Settings:
    """Resolved values with attribute access per section: `cfg.rack.drain_timeout`."""

    SECRET_KEYS: frozenset = frozenset()

    def __init__(self, values: dict[str, dict], source: str | None):
        self.source = source
        self._values = values
        for section, keys in values.items():
            setattr(self, section, SimpleNamespace(**keys))

    def as_dict(self, redact: bool = False) -> dict[str, dict]:
        out = {}
        for section, keys in self._values.items():
            ns = getattr(self, section)
            out[section] = {}
            for key in keys:
                value = getattr(ns, key)
                if redact and (section, key) in self.SECRET_KEYS and value:
                    value = "********"
                out[section][key] = value
        return out
