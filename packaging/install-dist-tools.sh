#!/usr/bin/env bash
# The tools `make deb` and `make image-test` need beyond dpkg-deb: patchelf (the Mixer package
# drops the build machine's RUNPATH from bundled libraries), lintian (the packages must
# report no errors) and debootstrap (the amd64 install test builds a Debian 12 minbase rootfs
# once, cached in build/deb-rootfs/). Tried too but optional: podman (tests/test_image.py runs
# the image with it where it works and says why not where it does not; runc beside it, as crun
# refuses cgroup v1 hybrid hosts) and systemd-nspawn (tests/test_deb.py boots the rootfs with
# the package installed). A no-op when all are present; installs Debian's packages as root,
# and otherwise says what to install and fails.
set -euo pipefail
missing=()
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v patchelf >/dev/null 2>&1 || missing+=(patchelf)
if { ! command -v podman || ! command -v runc || ! command -v systemd-nspawn; } >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc systemd-container \
    >/dev/null 2>&1 || echo "podman/systemd-nspawn could not be installed: their tests say so and skip" >&2
fi
# The arm Rack images take their base from Debian's arm packages: where `make firmware-test`
# left an arm binary, apt must know that architecture (packaging/image.py downloads from it).
if [ "$(id -u)" = 0 ] && command -v dpkg >/dev/null 2>&1; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  added=0
  for arch in arm64 armhf; do
    if [ -x "${FIRMWARE_CACHE:-$here/firmware-tests/cache}/bin-$arch/fluxrig" ] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
      dpkg --add-architecture "$arch" && added=1
    fi
  done
  if [ "$added" = 1 ]; then apt-get update -qq || echo "apt-get update failed: the arm images will say why" >&2; fi
fi
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing: ${missing[*]} (apt-get install ${missing[*]}; needed by make deb / make image-test)" >&2
  exit 1
fi
echo "installing ${missing[*]} (for the package and image suites)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
