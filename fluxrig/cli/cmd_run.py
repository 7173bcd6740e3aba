"""`fluxrig run`: run the Rack until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from ..errors import FluxError
from ..logs import setup_logging
from .common import config_or_report

__all__ = ["register", "run", "register_reload", "reload_cmd"]


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
    register_reload(sub)


def _event_loop_policy() -> None:
    try:
        import uvloop  # optional extra: faster loop when installed
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(args) -> int:
    from ..rack import Rack

    cfg = config_or_report(args.config)
    if cfg is None:
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


def register_reload(sub) -> None:
    p = sub.add_parser(
        "reload",
        help="ask the running standalone Rack to re-read its scenario file (same as SIGHUP)",
        description="Send SIGHUP to the Rack that holds <base.state_dir>/.lock. The Rack validates the file; "
        "an invalid scenario is refused and the running graph stays as it is. Unchanged gears keep "
        "their connections (shadow swap); the outcome is logged by the Rack.",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="fluxrig.toml of the Rack (for base.state_dir)")
    p.set_defaults(func=reload_cmd)


def reload_cmd(args) -> int:
    import os
    import signal

    cfg = config_or_report(args.config)
    if cfg is None:
        return 2
    lock = os.path.join(cfg.base.state_dir, ".lock")
    try:
        with open(lock) as fh:
            pid = int(fh.read().strip() or 0)
    except (OSError, ValueError):
        print(f"fluxrig: no running Rack found ({lock} missing or empty)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"fluxrig: the Rack recorded in {lock} (pid {pid}) is not running", file=sys.stderr)
        return 1
    print(f"reload requested from Rack pid {pid}; see its log for the outcome")
    return 0
