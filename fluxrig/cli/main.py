"""`fluxrig`: the Rack agent and the operator's command line.

Each command group lives in its own module exposing `register(subparsers)`; a missing
optional module (a gear family not built into this binary) just leaves its command out.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS", "build_parser"]

COMMANDS = (
    "fluxrig.cli.cmd_run",
    "fluxrig.cli.cmd_version",
    "fluxrig.cli.cmd_check",
    "fluxrig.cli.cmd_config",
    "fluxrig.cli.cmd_scenario",
    "fluxrig.cli.cmd_gears",
    "fluxrig.cli.cmd_iso8583",
    "fluxrig.cli.cmd_wal",
    "fluxrig.cli.cmd_keys",
    "fluxrig.cli.cmd_admin",
    "fluxrig.cli.cmd_healthcheck",
    "fluxrig.cli.cmd_saf",
    "fluxrig.cli.cmd_haproxy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxrig",
        description="fluxrig Rack: runs a Scenario of gears (TCP, serial, ISO 8583, routing) and the operator CLI.",
        epilog="Start with `fluxrig run --scenario scenarios/tcp-echo.yaml`; `fluxrig COMMAND --help` for details.",
    )
    from .cmd_version import VersionFlag

    parser.add_argument("--version", action=VersionFlag, help="print version, commit and build date, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
