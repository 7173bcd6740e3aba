# Shared settings and helpers for the firmware tests (sourced, not run).
#
# Everything slow is cached under firmware-tests/cache/ (gitignored): the rootfs per architecture,
# the target-side venv and the frozen binaries. Heavy steps run under nice/ionice because the
# build machine is shared.

FW_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$FW_DIR/.." && pwd)"
CACHE_DIR="${FIRMWARE_CACHE:-$FW_DIR/cache}"
SUITE="${FIRMWARE_SUITE:-bookworm}"
NICE="nice -n 19 ionice -c3"

# What the target needs to build the Rack itself: its own CPython, a C toolchain for the Cython
# twins and (on armhf) the PyInstaller bootloader, zlib headers for the bootloader, libffi for
# cffi, binutils for PyInstaller's strip/objdump, and Debian's python3-nacl (PyPI has no armv7
# PyNaCl wheel; building libsodium from the sdist under emulation takes far too long).
ROOTFS_PACKAGES="python3,python3-venv,python3-pip,python3-dev,python3-nacl,python3-cffi-backend,gcc,libc6-dev,zlib1g-dev,libffi-dev,binutils,ca-certificates"
# Changing the package list or suite invalidates the cached rootfs.
ROOTFS_SPEC="$SUITE:$ROOTFS_PACKAGES"

log() { printf '[firmware-test] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

rootfs_dir() { printf '%s/rootfs-%s' "$CACHE_DIR" "$1"; }

qemu_name() {
  case "$1" in
    arm64) echo aarch64 ;;
    armhf) echo arm ;;
    *) die "unknown architecture $1 (arm64|armhf)" ;;
  esac
}

need_host_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing host tools: ${missing[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || die "could not install ${missing[*]}"
    else
      die "missing host tools: ${missing[*]} (apt-get install ${missing[*]})"
    fi
  fi
}

# binfmt_misc lets the kernel hand foreign ELF files to qemu-*-static, so every process inside the
# rootfs (shell, dpkg, gcc, pip) runs emulated. Without it only a single explicit
# `qemu-<arch>-static prog` would run, and debootstrap's second stage, pip and gcc all fork.
ensure_binfmt() {
  local q; q="$(qemu_name "$1")"
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || die "binfmt_misc is not mounted and cannot be mounted here (need root or a privileged container)"
  fi
  if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$q" ]; then
    update-binfmts --enable "qemu-$q" >/dev/null 2>&1 || die "cannot register qemu-$q with binfmt_misc"
  fi
  grep -q '^enabled' "/proc/sys/fs/binfmt_misc/qemu-$q" || die "binfmt entry qemu-$q is disabled"
  # "F" = the interpreter is opened at registration time, so it works inside a chroot without a copy.
  grep -q '^flags:.*F' "/proc/sys/fs/binfmt_misc/qemu-$q" \
    || cp "/usr/bin/qemu-$q-static" "$(rootfs_dir "$1")/usr/bin/" 2>/dev/null || true
}

# Bind the host's kernel file systems into the rootfs for a build or a run; idempotent.
mount_rootfs() {
  local root="$1" m
  for m in proc sys dev dev/pts; do
    mkdir -p "$root/$m"
    mountpoint -q "$root/$m" && continue
    case "$m" in
      proc) mount -t proc proc "$root/proc" ;;
      sys) mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys" ;;
      dev) mount --bind /dev "$root/dev" ;;
      dev/pts) mount --bind /dev/pts "$root/dev/pts" ;;
    esac
  done
  cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
}

umount_rootfs() {
  local root="$1" m
  [ -d "$root" ] || return 0
  for m in dev/pts dev sys proc; do
    if mountpoint -q "$root/$m"; then umount -R "$root/$m" 2>/dev/null || umount -lR "$root/$m" || true; fi
  done
}

# Refuse to delete a rootfs that still has something mounted inside: /dev is a bind mount of the
# host's, and rm -rf through it would wipe the host's device nodes.
assert_unmounted() {
  local root; root="$(readlink -f "$1")"
  if awk -v r="$root/" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    die "something is still mounted under $root; not deleting it"
  fi
}

in_rootfs() {
  # Run a command inside the rootfs as root with a clean, predictable environment.
  local root="$1"; shift
  chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 "$@"
}
