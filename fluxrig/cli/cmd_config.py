"""`fluxrig config`: the effective configuration, or a commented example of every key."""

from __future__ import annotations

import json

from ..config import DUR, SCHEMA
from ..durations import format_duration
from ..settings import example_toml
from .common import config_or_report

__all__ = ["register", "example", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "config",
        help="show the effective configuration, or print a commented fluxrig.toml with every key",
        description="Print the configuration the Rack would run with (defaults < file < FLUXRIG_* environment), "
        "or with --example a commented fluxrig.toml listing every key, its default and meaning.",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="fluxrig.toml to read")
    p.add_argument("--example", action="store_true", help="print a commented example file with the defaults")
    p.add_argument("--json", action="store_true", help="print the effective configuration as JSON")
    p.set_defaults(func=run)


def _toml_value(kind: str, value) -> str:
    if kind == DUR:
        return json.dumps(format_duration(value) if isinstance(value, (int, float)) else value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


def example() -> str:
    return example_toml(SCHEMA, "# fluxrig.toml: every key with its default. Environment: FLUXRIG_<SECTION>_<KEY>.")


def run(args) -> int:
    if args.example:
        print(example())
        return 0
    cfg = config_or_report(args.config)
    if cfg is None:
        return 2
    values = cfg.as_dict(redact=True)
    if args.json:
        print(json.dumps(values, indent=2))
        return 0
    for section, keys in values.items():
        print(f"[{section}]")
        for key, value in keys.items():
            print(f"{key} = {_toml_value(SCHEMA[section][key][0], value)}")
        print()
    return 0
