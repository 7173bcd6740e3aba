#!/usr/bin/env bash
# Make sure `systemd-analyze` is present for tests/test_systemd.py (unit verification).
#
# A no-op when it is already installed. Otherwise installs Debian's `systemd` package, which
# needs root and apt-get (a clean CI machine runs as root); anywhere else it says what to do and
# fails, so the suite never silently skips the unit checks.
set -euo pipefail
command -v systemd-analyze >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "systemd-analyze is missing: install the 'systemd' package (needed by tests/test_systemd.py)" >&2
  exit 1
fi
echo "installing the systemd package (for systemd-analyze)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 \
  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
command -v systemd-analyze >/dev/null
