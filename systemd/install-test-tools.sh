#!/usr/bin/env bash
# Make sure `systemd-analyze` (tests/test_systemd.py, unit verification) and libfaketime
# (tests/test_mixer_verbs.py) are present.
#
# A no-op when it is already installed. Otherwise installs Debian's `systemd` package, which
# needs root and apt-get (a clean CI machine runs as root); anywhere else it says what to do and
# fails, so the suite never silently skips the unit checks.
set -euo pipefail

# libfaketime for tests/test_mixer_verbs.py (a Rack whose clock is 10 min off, or at 1970).
if ! compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "libfaketime is missing: install the 'libfaketime' package (needed by tests/test_mixer_verbs.py)" >&2
    exit 1
  fi
  echo "installing the libfaketime package (for the clock-skew tests)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libfaketime >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libfaketime >/dev/null; }
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "systemd-analyze is missing: install the 'systemd' package (needed by tests/test_systemd.py)" >&2
    exit 1
  fi
  echo "installing the systemd package (for systemd-analyze)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
  command -v systemd-analyze >/dev/null
fi

# -- archive: Debian's clickhouse-server for the ClickHouse telemetry tests (tests/clickhouse_server.py).
# The tests start their own server (own ports, config and data in a temp dir); the package's
# service must not start: a policy-rc.d that denies it is in place for the install, so it works
# the same with or without systemd running.
if ! command -v clickhouse-server >/dev/null 2>&1 && [ ! -x /usr/sbin/clickhouse-server ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "clickhouse-server is missing: install Debian's 'clickhouse-server' (needed by the archive tests)" >&2
    exit 1
  fi
  echo "installing the clickhouse-server package (for the ClickHouse archive tests)" >&2
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends clickhouse-server >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends clickhouse-server >/dev/null; }
  [ -n "$policy_added" ] && rm -f /usr/sbin/policy-rc.d
  [ -x /usr/sbin/clickhouse-server ] || command -v clickhouse-server >/dev/null
fi

# -- console: the web console suite (tests/test_console_browser.py) drives Debian's headless
# Chromium through chromedriver (selenium); nothing downloads a browser.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium and chromium-driver are missing: install them (needed by tests/test_console_browser.py)" >&2
    exit 1
  fi
  echo "installing chromium and chromium-driver (for the console browser tests)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }
fi

# -- group: Debian's haproxy in front of a Rack group (tests/test_rack_haproxy.py, bench/cluster.py).
# The tests run their own haproxy (own config and ports in a temp dir, foreground); the package's
# service must not start, so a policy-rc.d denies it during the install, as for clickhouse.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "haproxy is missing: install Debian's 'haproxy' (needed by tests/test_rack_haproxy.py)" >&2
    exit 1
  fi
  echo "installing the haproxy package (for the Rack group balancer tests)" >&2
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends haproxy >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }
  [ -n "$policy_added" ] && rm -f /usr/sbin/policy-rc.d
  [ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null
fi
