"""A real ClickHouse server for the tests: Debian's `clickhouse-server`, on free loopback ports,
with its own config, users and data dir in a temp folder; started and stopped by the tests.

`systemd/install-test-tools.sh` (run by `make test`) installs the package; the package's own
service is never used (it does not start without systemd, and the tests need their own ports).
When the binary is absent the fixtures skip with a loud reason naming the package, so a
missing install step is visible in the summary; CI installs it.

One server per test session (`clickhouse` fixture in conftest.py): a start costs about a
second. Tests isolate themselves with a database of their own (`fresh_database`). Tests that
stop the server (outages) start their own `ClickHouseServer`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid

__all__ = ["ClickHouseServer", "clickhouse_binary", "MISSING", "fresh_database", "USER"]

USER = "fluxrig"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
MISSING = (
    "clickhouse-server is NOT INSTALLED: the ClickHouse archive tests did not run. "
    "Install Debian's clickhouse-server (systemd/install-test-tools.sh does it; `make test` runs that)"
)


def clickhouse_binary() -> str | None:
    for cand in (shutil.which("clickhouse-server"), "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"):
        if cand and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("clickhouse")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{root}/log/server.log</log><errorlog>{root}/log/error.log</errorlog>
    <size>10M</size><count>1</count></logger>
  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <interserver_http_port>{inter}</interserver_http_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{root}/data/</path>
  <tmp_path>{root}/tmp/</tmp_path>
  <user_files_path>{root}/user_files/</user_files_path>
  <format_schema_path>{root}/format_schemas/</format_schema_path>
  <mark_cache_size>67108864</mark_cache_size>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
  <users_config>{root}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
</yandex>
"""

_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users>
    <{user}><password_sha256_hex>{sha}</password_sha256_hex><networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile><quota>default</quota></{user}>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"""


class ClickHouseServer:
    """One clickhouse-server child. `start()`, `stop()`, `kill()`; `port`, `password_file`."""

    def __init__(self, root: str, binary: str | None = None):
        self.root = os.path.abspath(root)
        self.binary = binary or clickhouse_binary()
        if not self.binary:
            raise RuntimeError(MISSING)
        self.port = _free_port()
        self.http_port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self.password_file = os.path.join(self.root, "password")
        self.proc: subprocess.Popen | None = None
        for sub in ("log", "data", "tmp", "user_files", "format_schemas"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        with open(os.path.join(self.root, "users.xml"), "w") as fh:
            fh.write(_USERS.format(user=USER, sha=hashlib.sha256(self.password.encode()).hexdigest()))
        with open(os.path.join(self.root, "config.xml"), "w") as fh:
            fh.write(_CONFIG.format(root=self.root, tcp=self.port, http=self.http_port, inter=_free_port()))

    def client(self, database: str = "default"):
        from clickhouse_driver import Client

        return Client(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, database=database, connect_timeout=2
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        out = open(os.path.join(self.root, "log", "stdout.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config-file={self.root}/config.xml"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                c = self.client()
                c.execute("SELECT 1")
                c.disconnect()
                return
            except Exception as exc:  # not listening yet
                last = exc
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"clickhouse-server did not answer within {timeout}s ({last}): {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "log", "error.log"), errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def fresh_database(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
