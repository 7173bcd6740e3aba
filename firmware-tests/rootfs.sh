#!/usr/bin/env bash
# Make (once) a Debian rootfs for one target architecture and leave it under firmware-tests/cache/.
#
#   firmware-tests/rootfs.sh arm64|armhf
#
# Two stages: debootstrap --foreign unpacks the target's packages on the host, then the second
# stage runs *inside* the rootfs through QEMU user mode (binfmt_misc with qemu-user-static's
# "F" flag, so the emulator needs no copy inside the chroot). A stamp file marks a finished
# rootfs: an interrupted run is removed and started again rather than trusted half-made.
# The mirror is debootstrap's own default unless FIRMWARE_MIRROR is set (e.g. a local cache).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=firmware-tests/common.sh
. "$here/common.sh"

arch="${1:?usage: rootfs.sh arm64|armhf}"
root="$(rootfs_dir "$arch")"
stamp="$root/.fluxrig-rootfs-ok"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$ROOTFS_SPEC" ]; then
  log "$arch: rootfs cached at $root"
  exit 0
fi

need_host_tools
ensure_binfmt "$arch"
umount_rootfs "$root"
assert_unmounted "$root"
rm -rf "$root"
mkdir -p "$root"
log "$arch: debootstrap $SUITE (first stage, host side)"
# shellcheck disable=SC2086
$NICE debootstrap --foreign --arch="$arch" --variant=minbase --include="$ROOTFS_PACKAGES" \
  "$SUITE" "$root" ${FIRMWARE_MIRROR:-} >"$root.debootstrap.log" 2>&1 \
  || { tail -20 "$root.debootstrap.log" >&2; die "$arch: debootstrap first stage failed"; }
log "$arch: debootstrap second stage (inside the rootfs, under QEMU)"
$NICE chroot "$root" /debootstrap/debootstrap --second-stage >>"$root.debootstrap.log" 2>&1 \
  || { tail -20 "$root.debootstrap.log" >&2; die "$arch: debootstrap second stage failed"; }
echo "$ROOTFS_SPEC" > "$stamp"
log "$arch: rootfs ready"
