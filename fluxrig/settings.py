"""The configuration engine shared by the Rack (`fluxrig.toml`) and the Mixer
(`fluxrig-mixer.toml`): a schema of typed keys, three layers (defaults < TOML file <
environment), strict coercion, and a commented example file.

A schema maps section -> key -> (type, default, one-line doc, choices or None); types are
"str", "int", "float", "bool", "duration" (a string with a unit, stored as seconds) and "urls"
(a comma list or a TOML list of strings, stored as one comma-joined string). Any
unknown key, wrong type or bad duration raises ConfigError naming the dotted key.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from types import SimpleNamespace

from .durations import parse_duration
from .errors import ConfigError

__all__ = [
    "DUR",
    "STR",
    "INT",
    "BOOL",
    "FLOAT",
    "URLS",
    "split_urls",
    "MAX_URLS",
    "coerce",
    "defaults",
    "read_toml",
    "read_env",
    "example_toml",
    "Settings",
    "check_ranges",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION_S",
    "MAX_INT",
    "PORT_RANGE",
]

DUR, STR, INT, BOOL, FLOAT = "duration", "str", "int", "bool", "float"
# Several addresses of one service (a clustered Snake, peer routes): `"a,b"` or `["a", "b"]` in
# TOML, a comma list in the environment; kept as one comma-joined string so a one-URL value reads
# as before.
URLS = "urls"
MAX_URLS = 64
# Limits every key obeys whatever its schema says: a configuration file is small and flat, a
# duration longer than ten years or an integer past 2**53 is a typo (or 99999999999d) that would
# otherwise overflow a timer or a DuckDB BIGINT far from the key that caused it.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_DURATION_S = 10 * 365 * 86400.0
MAX_INT = 2**53
# Keys named `port` or `*_port` are TCP ports (0 = pick a free one).
PORT_RANGE = (0, 65535)
_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")
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
        except (ValueError, OverflowError) as exc:
            raise ConfigError(str(exc), where) from None
        if not math.isfinite(value) or value > MAX_DURATION_S:
            raise ConfigError(f"duration {value:g}s is longer than the limit of {MAX_DURATION_S / 86400:.0f}d", where)
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
        if value > MAX_INT:
            raise ConfigError(f"{value} is larger than the limit of 2**53", where)
        if key == "port" or key.endswith("_port"):
            lo, hi = PORT_RANGE
            if not lo <= value <= hi:
                raise ConfigError(f"a TCP port is {lo}..{hi} (0 = pick a free port), got {value}", where)
    elif kind == URLS:
        if isinstance(value, (list, tuple)) and not from_env:
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"expected a list of strings, got {value!r}", where)
            items = [v.strip() for v in value]
        elif isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        else:
            raise ConfigError(f"expected a URL, a comma list or a list of URLs, got {value!r}", where)
        items = [v for v in items if v]
        if len(items) > MAX_URLS:
            raise ConfigError(f"{len(items)} addresses; at most {MAX_URLS}", where)
        bad = [v for v in items if "," in v or any(c.isspace() for c in v)]
        if bad:
            raise ConfigError(f"an address holds a comma or a space: {bad[0]!r}", where)
        value = ",".join(items)
    elif kind == FLOAT:
        try:
            value = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            raise ConfigError(f"expected a finite non-negative number, got {value!r}", where)
    elif not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", where)
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(map(str, choices))}", where)
    return value


def split_urls(value: str) -> list[str]:
    """The addresses of a "urls" key (or of any comma list), blanks dropped."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def defaults(schema: dict) -> dict[str, dict]:
    return {
        s: {k: (coerce(schema, s, k, spec[1], True) if spec[0] == DUR else spec[1]) for k, spec in keys.items()}
        for s, keys in schema.items()
    }


def read_toml(schema: dict, path: str, values: dict) -> None:
    """Apply the TOML file at `path` over `values`."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE.search(str(exc))
        where = f"{path}:{m.group(1)}" if m else path
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deeply to be a configuration") from None
    except ValueError as exc:  # Python's own limit on long digit strings, and the like
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for section, body in doc.items():
        if section not in schema:
            raise ConfigError(f"unknown section [{section}] in {path}; known: {', '.join(schema)}", section)
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table", section)
        for key, value in body.items():
            if key not in schema[section]:
                raise ConfigError(
                    f"unknown key in {path}; known keys of [{section}]: {', '.join(schema[section])}",
                    f"{section}.{key}",
                )
            values[section][key] = coerce(schema, section, key, value, from_env=False)


def read_env(
    schema: dict,
    env,
    prefix: str,
    values: dict,
    *,
    unknown_sections_are_errors: bool,
    aliases: dict[str, str] | None = None,
) -> None:
    """Apply `<prefix><SECTION>_<KEY>` variables; `aliases` maps a bare name (after the prefix,
    lower-case) to a dotted key. Variables naming no section are errors or ignored, as asked."""
    by_length = sorted(schema, key=len, reverse=True)
    for name, value in env.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].lower()
        if aliases and rest in aliases:
            section, _, key = aliases[rest].partition(".")
        else:
            section = next((s for s in by_length if rest.startswith(s + "_")), None)
            if section is None:
                if unknown_sections_are_errors:
                    raise ConfigError(f"environment variable {name} names no section ({', '.join(schema)})", rest)
                continue
            key = rest[len(section) + 1 :]
        if key not in schema[section]:
            raise ConfigError(f"environment variable {name} names an unknown key", f"{section}.{key}")
        values[section][key] = coerce(schema, section, key, value, from_env=True)


def check_ranges(values: dict[str, dict], ranges: dict[str, tuple]) -> None:
    """ConfigError naming the first key of `ranges` ({"section.key": (low, high)}, either bound
    None for open) whose value lies outside. Run after every layer (file, environment, flags)."""
    for dotted, (lo, hi) in ranges.items():
        section, _, key = dotted.partition(".")
        value = values[section][key]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            shown = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            raise ConfigError(f"must be in {shown}, got {value!r}", dotted)


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
            elif kind == URLS:
                rendered = json.dumps(split_urls(default))
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
