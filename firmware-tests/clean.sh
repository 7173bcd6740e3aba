#!/usr/bin/env bash
# Remove the firmware-test cache (rootfs folders, target venvs, binaries), unmounting first.
#   firmware-tests/clean.sh            everything under firmware-tests/cache/
#   firmware-tests/clean.sh --binaries only the built binaries (forces a rebuild, keeps rootfs + venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=firmware-tests/common.sh
. "$here/common.sh"
[ -d "$CACHE_DIR" ] || exit 0
if [ "${1:-}" = "--binaries" ]; then
  rm -rf "$CACHE_DIR"/bin-*
  exit 0
fi
for root in "$CACHE_DIR"/rootfs-*; do
  [ -d "$root" ] || continue
  umount_rootfs "$root"
  assert_unmounted "$root"
done
rm -rf "$CACHE_DIR"
log "removed $CACHE_DIR"
