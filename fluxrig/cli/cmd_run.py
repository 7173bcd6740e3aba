"""`fluxrig run`: run the Rack until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from ..config import load_config
from ..errors import FluxError
from ..logs import setup_logging


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run the Rack (standalone with --scenario, or joined to a Mixer via fluxrig.toml)",
        description=(
            "Run the Rack until SIGTERM/SIGINT (drains in-flight work within rack.drain_timeout, then exits 0). "
            "SIGHUP re-reads the scenario file. Without -c, defaults and FLUXRIG_* variables apply "
            "(e.g. FLUXRIG_BASE_STATE_DIR=/var/lib/fluxrig)."
        ),
    )
    p.add_argument("-c", "--config", metavar="FILE", help="fluxrig.toml (default: built-in defaults + FLUXRIG_* env)")
    p.add_argument("-s", "--scenario", metavar="FILE", help="scenario YAML/TOML to run (overrides base.scenario)")
    p.set_defaults(func=run)


def _event_loop_policy() -> None:
    try:
        import uvloop  # optional extra: faster loop when installed
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(args) -> int:
    from ..rack import Rack

    try:
        cfg = load_config(args.config)
    except FluxError as exc:
        print(f"fluxrig: configuration error: {exc}", file=sys.stderr)
        return 2
    lg = cfg.logging
    setup_logging(lg.level, lg.format, lg.filename, lg.trace, lg.debug)
    _event_loop_policy()
    rack = Rack(cfg, args.scenario)
    try:
        return asyncio.run(rack.run())
    except FluxError as exc:
        print(f"fluxrig: {exc}", file=sys.stderr)
        return 2
