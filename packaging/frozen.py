"""Frozen builds, kept per source hash under build/frozen/: build once, reuse everywhere.

    python packaging/frozen.py fluxrig|fluxrig-onedir|fluxrig-mixer     prints the built path

A PyInstaller build costs minutes of CPU, and `make image`, `make deb` and the image tests all
need the same binaries. This module hashes what goes into a build (the tracked and untracked but
not ignored files under the inputs below, path and content, sorted) and keeps each build in
`build/frozen/<target>-<hash>/`; a second call with an unchanged tree returns the same folder
without building. Only the newest KEEP builds per target are kept.

The build itself is packaging/build.sh (accelerated twins required, commit and build date
stamped). SOURCE_DATE_EPOCH is passed through: set, the stamped build date is the commit time,
and with PYTHONHASHSEED=0 (build.sh) two builds of the same tree are byte-identical where
PyInstaller allows (packaging/README.md says what was measured).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

__all__ = ["ROOT", "TARGETS", "source_hash", "built", "ensure"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = 2
# What each build reads; a change anywhere else (tests, docs, the other program) costs no rebuild.
RACK_INPUTS = ("fluxrig", "setup.py", "pyproject.toml", "packaging/fluxrig.spec", "packaging/fluxrig_entry.py")
MIXER_INPUTS = RACK_INPUTS + ("mixer", "packaging/fluxrig-mixer.spec", "packaging/fluxrig_mixer_entry.py")
TARGETS = {
    # target: (inputs, what the build leaves in DISTPATH)
    "fluxrig": (RACK_INPUTS, "fluxrig"),
    "fluxrig-onedir": (RACK_INPUTS, "fluxrig-onedir"),
    "fluxrig-mixer": (MIXER_INPUTS, "fluxrig-mixer"),
}
_SKIP_SUFFIXES = (".c", ".so", ".pyc")  # build products beside the sources, rebuilt by build.sh


def _files(inputs) -> list[str]:
    out = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "-co", "--exclude-standard", "--", *inputs, "packaging/build.sh"],
        capture_output=True,
        check=True,
    ).stdout
    names = sorted({n.decode() for n in out.split(b"\0") if n})
    return [n for n in names if os.path.isfile(os.path.join(ROOT, n)) and not n.endswith(_SKIP_SUFFIXES)]


def source_hash(target: str) -> str:
    inputs, _ = TARGETS[target]
    h = hashlib.sha256()
    for name in _files(inputs):
        with open(os.path.join(ROOT, name), "rb") as fh:
            data = fh.read()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def built(target: str) -> str:
    """Where the build of the current tree lives (it may not exist yet)."""
    _, product = TARGETS[target]
    return os.path.join(ROOT, "build", "frozen", f"{target}-{source_hash(target)}", product)


def ensure(target: str, python: str | None = None) -> str:
    """The path of the frozen build of the current tree, building it when missing."""
    if target not in TARGETS:
        raise SystemExit(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    path = built(target)
    home = os.path.dirname(path)
    if os.path.exists(os.path.join(home, ".complete")):
        return path
    # One build at a time per tree: build.sh writes fluxrig/_build_info.py and removes it when
    # it ends, so a second build running meanwhile would freeze a tree without it.
    os.makedirs(os.path.join(ROOT, "build", "frozen"), exist_ok=True)
    with open(os.path.join(ROOT, "build", "frozen", ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(home, ".complete")):  # built while we waited
            return path
        return _build(target, python, path, home)


def _build(target: str, python: str | None, path: str, home: str) -> str:
    shutil.rmtree(home, ignore_errors=True)
    tmp = home + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ)
    # Not under build/pyinstaller: packaging/build.sh's own default work folder keeps
    # build/pyinstaller/<spec>/<program>, a file where this build wants a folder of that name
    # (PyInstaller then failed with FileExistsError after a `make binary-mixer`).
    env.update(DISTPATH=tmp, WORKPATH=os.path.join(ROOT, "build", "pyinstaller-frozen", target))
    env.setdefault("PYTHON", python or sys.executable)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run([*nice, os.path.join(ROOT, "packaging", "build.sh"), target], cwd=ROOT, env=env, check=True)
    open(os.path.join(tmp, ".complete"), "w").close()
    os.rename(tmp, home)
    _prune(target, keep=home)
    return path


def _prune(target: str, keep: str) -> None:
    base = os.path.join(ROOT, "build", "frozen")
    mine = [
        os.path.join(base, d) for d in os.listdir(base) if d.startswith(target + "-") and d[len(target) + 1 :].isalnum()
    ]
    mine.sort(key=os.path.getmtime, reverse=True)
    for old in [d for d in mine if d != keep][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} {'|'.join(TARGETS)}")
    print(ensure(sys.argv[1]))
