#!/usr/bin/env bash
# `make firmware-test`: build the frozen Rack for arm64 and armhf inside Debian rootfs folders
# and smoke-test it under QEMU user mode. Prints one JSON line per architecture on stdout
# (progress goes to stderr):
#   {"arch", "binary_bytes", "start_to_ready_s", "idle_rss_mb", "smoke_tcp_echo",
#    "smoke_iso8583", "smoke_serial", ...}
#
#   firmware-tests/run.sh [--build-only] [arm64] [armhf]      (default: both)
#
# Needs root (debootstrap, chroot, mounts, binfmt_misc) and the project's .venv on the host (the
# smoke driver is host Python talking TCP and a pty to the emulated Rack). Slow the first time
# (debootstrap, pip builds under emulation: see target-build.sh); everything is cached under
# firmware-tests/cache/: the rootfs and the target venv until their package lists change, the
# binary until the source tree changes (bin-<arch>/src.sha256: firmware-tests/src-hash.sh of the
# tree it was built from; bin-<arch>/commit: the commit it was built at). FIRMWARE_CACHE,
# FIRMWARE_SUITE, FIRMWARE_MIRROR override.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=firmware-tests/common.sh
. "$here/common.sh"

build_only=0
archs=()
for a in "$@"; do
  case "$a" in
    --build-only) build_only=1 ;;
    arm64|armhf) archs+=("$a") ;;
    *) die "usage: run.sh [--build-only] [arm64] [armhf]" ;;
  esac
done
[ "${#archs[@]}" -gt 0 ] || archs=(arm64 armhf)
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and binfmt_misc)"
HOST_PY="${HOST_PYTHON:-$REPO_DIR/.venv/bin/python}"
[ -x "$HOST_PY" ] || die "no host venv at $HOST_PY: run 'make install' first"
mkdir -p "$CACHE_DIR"

mounted=()
src_tar="$(mktemp "$CACHE_DIR/src.XXXXXX.tar")"  # per run: two runs (one per arch) may overlap
cleanup() {
  local r
  for r in "${mounted[@]:-}"; do [ -n "$r" ] && umount_rootfs "$r"; done
  rm -f "$src_tar"
}
trap cleanup EXIT

# The source as the build sees it (firmware-tests/src-hash.sh says which files and how they are
# packed; packaging/image.py and deb.py run the same script to refuse a binary of another tree).
src_hash="$("$here/src-hash.sh" --tar "$src_tar")" || die "cannot pack the source (firmware-tests/src-hash.sh)"
commit="$(git -C "$REPO_DIR" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
[ -z "$(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit-dirty"

build_arch() {
  local arch="$1" root out
  root="$(rootfs_dir "$arch")"
  out="$CACHE_DIR/bin-$arch"
  if [ -x "$out/fluxrig" ] && [ "$(cat "$out/src.sha256" 2>/dev/null)" = "$src_hash" ]; then
    log "$arch: binary cached ($out/fluxrig, source unchanged)"
    return 0
  fi
  mount_rootfs "$root"; mounted+=("$root")
  rm -rf "$root/src" && mkdir -p "$root/src" && tar -xf "$src_tar" -C "$root/src"
  # pip inside the rootfs trusts what the host trusts (a build machine behind a TLS-inspecting
  # proxy has that proxy's CA in its own bundle, not in the rootfs's fresh ca-certificates).
  local host_ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  local ca_env=()
  if [ -f "$host_ca" ]; then
    cp "$host_ca" "$root/etc/ssl/certs/fluxrig-host-ca.crt"
    ca_env=(PIP_CERT=/etc/ssl/certs/fluxrig-host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/fluxrig-host-ca.crt)
  fi
  log "$arch: building inside the rootfs under QEMU (commit $commit)"
  local t0=$SECONDS
  $NICE chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${ca_env[@]}" \
    PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-120}" \
    FLUXRIG_COMMIT="$commit" /src/firmware-tests/target-build.sh "$arch" \
    || die "$arch: target build failed"
  mkdir -p "$out"
  # src.sha256 last: it is what says "this binary is of that source", so a run stopped midway
  # leaves a binary that image.py and deb.py refuse, never an old hash beside a new binary.
  rm -f "$out/src.sha256" "$out/commit"
  cp "$root/src/dist/fluxrig" "$out/fluxrig"
  echo "$commit" > "$out/commit"
  echo "$src_hash" > "$out/src.sha256"
  log "$arch: built in $((SECONDS - t0)) s: $(stat -c %s "$out/fluxrig") bytes"
}

smoke_arch() {
  local arch="$1" root
  root="$(rootfs_dir "$arch")"
  mount_rootfs "$root"; mounted+=("$root")
  # The binary and the scenarios it is tested with, where a gateway would have them.
  install -D -m 0755 "$CACHE_DIR/bin-$arch/fluxrig" "$root/usr/local/bin/fluxrig"
  rm -rf "$root/opt/fluxrig-smoke" && mkdir -p "$root/opt/fluxrig-smoke"
  cp "$REPO_DIR"/scenarios/*.yaml "$root/opt/fluxrig-smoke/"
  if compgen -G "$here/scenarios/*.yaml" >/dev/null; then cp "$here"/scenarios/*.yaml "$root/opt/fluxrig-smoke/"; fi
  "$HOST_PY" "$here/smoke.py" --arch "$arch" --rootfs "$root" --binary /usr/local/bin/fluxrig \
    --scenarios /opt/fluxrig-smoke --host-binary "$CACHE_DIR/bin-$arch/fluxrig"
}

for arch in "${archs[@]}"; do
  "$here/rootfs.sh" "$arch"
  ensure_binfmt "$arch"
  build_arch "$arch"
done
[ "$build_only" = 1 ] && exit 0
status=0
for arch in "${archs[@]}"; do
  smoke_arch "$arch" || status=1
done
exit "$status"
