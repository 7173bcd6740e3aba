#!/usr/bin/env bash
# The identity of the source an arm Rack binary is built from: prints the sha256 of a
# deterministic tar of the Rack's build inputs, one line, nothing else on stdout.
#
#   firmware-tests/src-hash.sh [--tar FILE]     (--tar: also leave that tar in FILE)
#
# The one definition of "the source" for both sides: firmware-tests/run.sh builds from this tar
# and records its hash in cache/bin-<arch>/src.sha256; packaging/image.py and packaging/deb.py
# run this script and refuse an arm binary whose recorded hash differs (a binary of an older
# tree under a label that names HEAD).
#
# The inputs are the tracked and untracked-but-not-ignored files of the work tree (what
# `make binary` would build) under BUILD_INPUTS: what goes into the Rack binary (README.md
# because pyproject.toml names it as the readme, which setuptools reads). A change to the tests,
# the Mixer, the image or package writers costs no emulated rebuild and makes no binary stale.
# Packed with sorted names, mtime 0 and owner 0, so an unchanged tree gives the same hash.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
BUILD_INPUTS=(setup.py pyproject.toml README.md fluxrig packaging/build.sh packaging/fluxrig.spec
              packaging/fluxrig_entry.py firmware-tests/target-build.sh)

tar_out=""
case "${1:-}" in
  "") ;;
  --tar) tar_out="${2:?usage: src-hash.sh [--tar FILE]}" ;;
  *) echo "usage: src-hash.sh [--tar FILE]" >&2; exit 2 ;;
esac
command -v git >/dev/null || { echo "src-hash.sh: git is needed (the build inputs are git's file list)" >&2; exit 1; }
tar --version 2>/dev/null | grep -q 'GNU tar' || { echo "src-hash.sh: GNU tar is needed (--sort=name)" >&2; exit 1; }

cleanup=""
if [ -z "$tar_out" ]; then
  tar_out="$(mktemp "${TMPDIR:-/tmp}/fluxrig-src.XXXXXX.tar")"
  cleanup="$tar_out"
fi
trap '[ -n "$cleanup" ] && rm -f "$cleanup"' EXIT
(cd "$REPO_DIR" && git ls-files -z -co --exclude-standard -- "${BUILD_INPUTS[@]}" \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$tar_out")
# Not a work tree (git listed nothing) would otherwise hash an empty archive.
[ "$(tar -tf "$tar_out" | wc -l)" -gt 0 ] || { echo "src-hash.sh: git lists no build inputs under $REPO_DIR" >&2; exit 1; }
sha256sum "$tar_out" | cut -d' ' -f1
