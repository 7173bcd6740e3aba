"""`fluxrig version`: version, commit, build date and the active speedup backend."""

from __future__ import annotations

import json
import os
import platform
import subprocess

from .. import _backend
from .._version import __version__


def build_info() -> dict:
    """Commit and build date stamped by packaging, else read from the git checkout."""
    try:
        from .. import _build_info  # written by packaging/build.sh into frozen builds

        return {"commit": _build_info.COMMIT, "build_date": _build_info.BUILD_DATE}
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"commit": commit or "unknown", "build_date": "unbuilt (source checkout)"}


def version_info() -> dict:
    backend = _backend.backend_name()
    return {
        "version": __version__,
        **build_info(),
        "backend": backend,
        "speedups": _backend.loaded_speedups(),
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine()}",
    }


def register(sub) -> None:
    p = sub.add_parser("version", help="print version, commit, build date and backend (cython or pure)",
                       description="Print version, commit, build date and the active backend. "
                                   "FLUXRIG_PURE_PYTHON=1 forces the pure-Python backend.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    info = version_info()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"fluxrig {info['version']} (commit {info['commit']}, built {info['build_date']})")
        print(f"backend: {info['backend']}  python {info['python']}  {info['platform']}")
    return 0
