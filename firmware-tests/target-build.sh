#!/usr/bin/env bash
# Runs INSIDE the target rootfs (under QEMU user mode): build the frozen Rack with the target's
# own Python, compiler and pip. Called by firmware-tests/run.sh as
#   chroot <rootfs> /src/firmware-tests/target-build.sh arm64|armhf
# with the source tree unpacked at /src and FLUXRIG_COMMIT set. Leaves /src/dist/fluxrig.
#
# Choices per architecture (PyPI wheels as of 2026-11, see ../shared/reference/anchors.md §6):
#   arm64  every dependency has a manylinux aarch64 wheel, PyInstaller included (prebuilt
#          bootloader); uvloop (optional extra) too. A plain venv, nothing from Debian.
#   armhf  no armv7 wheel for PyNaCl, cbor2, PyInstaller or uvloop. The venv sees Debian's
#          python3-nacl (+ python3-cffi-backend) through --system-site-packages. cbor2 is
#          built by pip from the 5.x sdist (its C extension, with the target's gcc): Debian's
#          python3-cbor2 is 5.4, below the security floor (constraints.txt: CVE-2026-26209,
#          CVE-2025-68131), and 6.x builds with Rust, which a gateway build root should not
#          need. pip builds PyInstaller from its sdist, compiling the bootloader
#          with the target's gcc and zlib; PyYAML builds from its sdist (pure, no libyaml);
#          uvloop is left out (optional; libuv under emulation costs tens of minutes) and the
#          Rack runs on the stock asyncio loop.
# The venv is cached inside the rootfs; a stamp holds the requirement set it was made from.
set -euo pipefail
arch="${1:?usage: target-build.sh arm64|armhf}"
VENV=/opt/fluxrig-venv
COMMON=("setuptools>=68" "wheel" "Cython>=3.0" "pyinstaller>=6.0" "nats-py>=2.6" "pyserial>=3.5"
        "PyYAML>=6.0")
case "$arch" in
  arm64) VENV_ARGS=(); EXTRA=("cbor2>=5.9.0" "pynacl>=1.5" "uvloop>=0.19"); DEBIAN=() ;;
  armhf) VENV_ARGS=(--system-site-packages); EXTRA=("cbor2>=5.9.0,<6"); DEBIAN=() ;;
  *) echo "unknown architecture $arch" >&2; exit 2 ;;
esac
want="$arch ${VENV_ARGS[*]:-} ${COMMON[*]} ${EXTRA[*]:-} debian:${DEBIAN[*]:-}"

if [ "${#DEBIAN[@]}" -gt 0 ] && ! dpkg-query -W -f='${Status}' "${DEBIAN[@]}" 2>/dev/null | grep -q "install ok installed"; then
  echo "[target $arch] apt-get install ${DEBIAN[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${DEBIAN[@]}" >&2
fi

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fluxrig-reqs" 2>/dev/null)" != "$want" ]; then
  echo "[target $arch] creating $VENV (pip installs; slow under emulation, cached afterwards)" >&2
  rm -rf "$VENV"
  python3 -m venv "${VENV_ARGS[@]}" "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  # --no-binary is not needed: where no wheel exists pip builds the sdist with the local gcc.
  "$VENV/bin/pip" install -q --disable-pip-version-check "${COMMON[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  if [ "$arch" = armhf ]; then
    # Debian's PyNaCl must be what the frozen binary bundles; cbor2 is the venv's, at the floor.
    "$VENV/bin/python" -c 'import nacl.bindings, cbor2, importlib.metadata as md; assert nacl.bindings.__file__.startswith("/usr/lib/python3/"), nacl.bindings.__file__; assert not cbor2.__file__.startswith("/usr/lib/python3/") and tuple(map(int, md.version("cbor2").split(".")[:2])) >= (5, 9), (cbor2.__file__, md.version("cbor2"))'
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
# The accelerated build is required on the target too: a twin that does not compile under the
# target's gcc stops the build instead of freezing a pure binary.
FLUXRIG_REQUIRE_ACCELERATED=1 PYTHON="$VENV/bin/python" packaging/build.sh fluxrig >&2
