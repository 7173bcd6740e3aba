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

The arm Racks are not built here but by `make firmware-test` (firmware-tests/run.sh, under
QEMU), which leaves them in firmware-tests/cache/bin-<arch>/ (FIRMWARE_CACHE moves it) with the
hash of the source they were built from (src.sha256) and the commit (commit).
`firmware_binary(arch)` hands such a binary out only when that hash is the one
firmware-tests/src-hash.sh gives for the current tree, and otherwise raises StaleBinaryError
naming both hashes and commits: an image or package must not pack an older tree's binary under
a label that names HEAD. `allow_stale=True` (image.py / deb.py `--allow-stale-arm`, or
FLUXRIG_ALLOW_STALE_ARM=1) packs it anyway, with a WARNING per architecture.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys

__all__ = [
    "ROOT",
    "TARGETS",
    "source_hash",
    "built",
    "ensure",
    "ALLOW_STALE_ENV",
    "FirmwareBinary",
    "FirmwareError",
    "StaleBinaryError",
    "firmware_cache",
    "firmware_source_hash",
    "firmware_binary",
]

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


# -- the arm Racks of `make firmware-test` --------------------------------------------------------
ALLOW_STALE_ENV = "FLUXRIG_ALLOW_STALE_ARM"
SRC_HASH_SCRIPT = os.path.join(ROOT, "firmware-tests", "src-hash.sh")
SRC_HASH_TIMEOUT_S = 120.0  # a tar of the Rack's sources: well under a second on a quiet box
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FirmwareError(RuntimeError):
    """The firmware cache cannot be checked (src-hash.sh failed)."""


class StaleBinaryError(FirmwareError):
    """An arm Rack binary in the firmware cache was built from another source than the tree's
    (or its hash was never recorded): the fields name both sides and what fixes it."""

    def __init__(self, arch: str, path: str, built_hash: str, built_commit: str, tree_hash: str, tree_commit: str):
        self.arch, self.path = arch, path
        self.built_hash, self.built_commit = built_hash, built_commit
        self.tree_hash, self.tree_commit = tree_hash, tree_commit
        super().__init__(
            f"the {arch} Rack binary {path} is stale: built from source {built_hash or '(no src.sha256)'} "
            f"at commit {built_commit}, but this tree is source {tree_hash} at commit {tree_commit}. "
            f"Run `make firmware-test` (as root) to rebuild it, or pass --allow-stale-arm "
            f"({ALLOW_STALE_ENV}=1) to pack it anyway"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class FirmwareBinary:
    arch: str
    path: str
    source_sha256: str  # of the tree it was built from ("" when never recorded)
    commit: str  # the commit it was built at, as run.sh recorded it
    stale: bool  # packed though the tree's source differs (allow_stale)


def firmware_cache() -> str:
    return os.environ.get("FIRMWARE_CACHE") or os.path.join(ROOT, "firmware-tests", "cache")


def firmware_source_hash() -> str:
    """firmware-tests/src-hash.sh of the current tree: the hash run.sh records for a build."""
    try:
        r = subprocess.run([SRC_HASH_SCRIPT], capture_output=True, text=True, timeout=SRC_HASH_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirmwareError(f"cannot run {SRC_HASH_SCRIPT}: {exc}") from None
    out = r.stdout.strip()
    if r.returncode != 0 or not _SHA256.match(out):
        raise FirmwareError(f"{SRC_HASH_SCRIPT} failed (exit {r.returncode}): {r.stderr.strip() or out!r}")
    return out


def _tree_commit() -> str:
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    commit = r.stdout.strip() if r.returncode == 0 else "unknown"
    dirty = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return commit + "-dirty" if dirty else commit


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def firmware_binary(arch: str, *, allow_stale: bool | None = None, log=print) -> FirmwareBinary | None:
    """The `make firmware-test` Rack for `arch`, None when there is none; StaleBinaryError when
    it was not built from the current tree, unless `allow_stale` (default: ALLOW_STALE_ENV=1),
    then it is returned with stale=True after a WARNING through `log`."""
    home = os.path.join(firmware_cache(), f"bin-{arch}")
    path = os.path.join(home, "fluxrig")
    if not os.path.isfile(path):
        return None
    built_hash = _read(os.path.join(home, "src.sha256"))
    built_commit = _read(os.path.join(home, "commit")) or "unknown (not recorded by that run.sh)"
    tree_hash = firmware_source_hash()
    if built_hash == tree_hash:
        return FirmwareBinary(arch, path, built_hash, built_commit, stale=False)
    err = StaleBinaryError(arch, path, built_hash, built_commit, tree_hash, _tree_commit())
    if allow_stale is None:
        allow_stale = os.environ.get(ALLOW_STALE_ENV, "") == "1"
    if not allow_stale:
        raise err
    log(f"WARNING: packing a STALE binary ({ALLOW_STALE_ENV}=1 / --allow-stale-arm): {err}")
    return FirmwareBinary(arch, path, built_hash, built_commit, stale=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} {'|'.join(TARGETS)}")
    print(ensure(sys.argv[1]))
