"""`fluxrig --version` and `fluxrig-mixer --version` (issue 20: what an image or a package is
checked with first): one line naming the program and its version, exit 0, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

from fluxrig._version import __version__


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_rack_version_flag():
    r = _run("-c", "import sys; from fluxrig.cli.main import main; sys.exit(main(['--version']))")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(f"fluxrig {__version__} (commit ") and "built " in line and "\n" not in line, line


def test_mixer_version_flag():
    r = _run("-m", "fluxrig_mixer.cli", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("fluxrig-mixer "), r.stdout
