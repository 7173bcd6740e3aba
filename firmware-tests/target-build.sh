#!/usr/bin/env bash
# Runs INSIDE the target rootfs (under QEMU user mode): build the frozen Rack with the target's
# own Python, compiler and pip. Called by firmware-tests/run.sh as
#   chroot <rootfs> /src/firmware-tests/target-build.sh arm64|armhf
# with the source tree unpacked at /src and FLUXRIG_COMMIT set. Leaves /src/dist/fluxrig.
#
# Choices per architecture (PyPI wheels as of 2026-11, see ../shared/reference/anchors.md §6):
#   arm64  every dependency has a manylinux aarch64 wheel, PyInstaller included (prebuilt
#          bootloader); uvloop (optional extra) too. A plain venv, nothing from Debian.
#   armhf  no armv7 wheel for PyNaCl or PyInstaller and none for uvloop: the venv sees Debian's
#          python3-nacl (+ python3-cffi-backend) through --system-site-packages; pip builds
#          PyInstaller from its sdist, which compiles the bootloader with the target's gcc and
#          zlib; cbor2 and PyYAML compile from their sdists; uvloop is left out (optional; libuv
#          under emulation costs tens of minutes) and the Rack runs on the asyncio loop.
# The venv is cached inside the rootfs; a stamp holds the requirement set it was made from.
set -euo pipefail
arch="${1:?usage: target-build.sh arm64|armhf}"
VENV=/opt/fluxrig-venv
COMMON=("setuptools>=68" "wheel" "Cython>=3.0" "pyinstaller>=6.0" "nats-py>=2.6" "cbor2>=5.4"
        "pyserial>=3.5" "PyYAML>=6.0")
case "$arch" in
  arm64) VENV_ARGS=(); EXTRA=("pynacl>=1.5" "uvloop>=0.19") ;;
  armhf) VENV_ARGS=(--system-site-packages); EXTRA=() ;;
  *) echo "unknown architecture $arch" >&2; exit 2 ;;
esac
want="$arch ${VENV_ARGS[*]:-} ${COMMON[*]} ${EXTRA[*]:-}"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fluxrig-reqs" 2>/dev/null)" != "$want" ]; then
  echo "[target $arch] creating $VENV (pip installs; slow under emulation, cached afterwards)" >&2
  rm -rf "$VENV"
  python3 -m venv "${VENV_ARGS[@]}" "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  # --no-binary is not needed: where no wheel exists pip builds the sdist with the local gcc.
  "$VENV/bin/pip" install -q --disable-pip-version-check "${COMMON[@]}" "${EXTRA[@]}"
  if [ "$arch" = armhf ]; then
    # Debian's PyNaCl must be what the frozen binary bundles.
    "$VENV/bin/python" -c 'import nacl, nacl.bindings, sys; assert nacl.__file__.startswith("/usr/lib/python3/"), nacl.__file__'
  fi
  echo "$want" > "$VENV/.fluxrig-reqs"
fi
"$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as md, platform, sys
names = ["pyinstaller", "Cython", "cbor2", "PyNaCl", "nats-py", "PyYAML", "pyserial", "uvloop"]
have = {}
for n in names:
    try:
        have[n] = md.version(n)
    except md.PackageNotFoundError:
        have[n] = None
print(f"[target] {platform.machine()} python {sys.version.split()[0]}: {have}")
PY

cd /src
PYTHON="$VENV/bin/python" packaging/build.sh fluxrig >&2
