"""`fluxrig version`: version, commit, build date and the backend of every Cython twin.

`backend` sums the twins up ("cython", "pure" or "mixed"); `backends` names each one
({"framing": "cython", "iso8583": "cython", "wal": "cython"}). Under FLUXRIG_REQUIRE_ACCELERATED=1
a missing twin makes the command fail (ImportError) instead of reporting a pure backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

from .. import _backend
from .._version import __version__

__all__ = ["build_info", "version_info", "register", "run", "VersionFlag"]


def build_info() -> dict:
    """Commit and build date stamped by packaging, else read from the git checkout."""
    try:
        from .. import _build_info  # written by packaging/build.sh into frozen builds

        return {"commit": _build_info.COMMIT, "build_date": _build_info.BUILD_DATE}
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=2
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"commit": commit or "unknown", "build_date": "unbuilt (source checkout)"}


def version_info() -> dict:
    return {
        "version": __version__,
        **build_info(),
        "backend": _backend.backend_name(),
        "backends": _backend.backends(),
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine()}",
    }


class VersionFlag(argparse.Action):
    """`fluxrig --version`: one line (version, commit, build date) and exit 0, read only when
    asked (build_info may run git); what an image or package check runs first."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        info = build_info()
        print(f"fluxrig {__version__} (commit {info['commit']}, built {info['build_date']})")  # stdout, as argparse's
        parser.exit(0)


def register(sub) -> None:
    p = sub.add_parser(
        "version",
        help="print version, commit, build date and backend (cython or pure)",
        description="Print version, commit, build date and the backend of each Cython twin "
        "(framing, iso8583, wal). FLUXRIG_PURE_PYTHON=1 forces the pure-Python backend; "
        "FLUXRIG_REQUIRE_ACCELERATED=1 makes a missing compiled twin an error.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    info = version_info()
    if args.json:
        print(json.dumps(info))
    else:
        twins = ", ".join(f"{name} {backend}" for name, backend in info["backends"].items())
        print(f"fluxrig {info['version']} (commit {info['commit']}, built {info['build_date']})")
        print(f"backend: {info['backend']} ({twins})  python {info['python']}  {info['platform']}")
    return 0
