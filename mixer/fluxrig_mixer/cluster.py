"""A Mixer node as a member of a nats-server cluster (issue 14, the Institutional tier).

Job. Turn the `[cluster]` section into what the supervised nats-server needs to be one member
of a cluster (`ClusterSpec`, rendered by `render_cluster_block` into snake.py's config), check
that section before anything starts (`check_cluster_values`), prepare a new node's state dir
from an existing node's (`seed_node`), and wait until the cluster's JetStream can take the
Mixer's streams (`wait_jetstream`). Nothing here is home-made clustering: routes, the meta
group, stream replicas and client discovery are nats-server's own (institutional.md §1.1).

Contract.

* A Mixer is clustered iff `cluster.routes` names peers (`MixerConfig.clustered`). Without
  routes nothing in this module runs and the Snake's config is byte-for-byte what a single
  node has always had (the Standard tier).
* Every node sets the same `cluster.name`, a unique `cluster.node_name` (the nats-server
  `server_name`; JetStream refuses two servers with one name) and the route URLs of the
  others (listing itself too is fine: nats-server ignores a route to itself, so one list can
  be copied to every node).
* Routes are authenticated, never open: route TLS with `verify` against the Snake's CA (each
  end presents a certificate from that CA, with both server and client use; host names are
  checked by nats-server on the routes it dials), and/or a shared password read from a file
  that must be mode 0600 (user ROUTE_USER). Neither configured is a ConfigError. The password
  goes into the 0600 nats-server.conf and the route URLs in it, never into argv or a log.
* Streams and buckets are created with `cluster.replicas` (default 3: survives the loss of
  one node; JetStream's maximum is 5). A replica count above the number of nodes the config
  names is refused at start.
* JetStream in a cluster needs a quorum of the meta group before it creates anything:
  `wait_jetstream` retries `account_info` until `cluster.ready_timeout`.
* Air-gapped: the only outbound connections a node's nats-server makes are to the route URLs
  listed here (routes it learns from peers point at those same nodes: gossip of members,
  never of third parties). No resolver, no leaf node, no gateway, no MQTT/websocket listener
  is ever rendered (tests/test_cluster_airgap.py checks the generated file).

Joining a node (`seed_node`, used by `fluxrig-mixer up --cluster N` and documented in
mixer/README.md): a node must share with the others the cluster key (it signs passports; a
Rack pins its public half), the CA (Racks verify every node's certificate against it; each
node issues its own server and route certificates from it) and the route password file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fluxrig.errors import ConfigError, FluxError
from fluxrig.settings import split_urls

__all__ = [
    "ClusterSpec",
    "ClusterError",
    "ROUTE_USER",
    "ROUTE_SCHEMES",
    "MIN_ROUTE_PASSWORD_CHARS",
    "ROUTE_TLS_TIMEOUT_S",
    "JETSTREAM_POLL_S",
    "SEED_FILES",
    "build_spec",
    "check_cluster_values",
    "read_route_password",
    "render_cluster_block",
    "route_hosts",
    "seed_node",
    "wait_jetstream",
    "retry_while_forming",
    "ClusterView",
    "STATUS_TIMEOUT_S",
]

log = logging.getLogger("fluxrig.mixer.cluster")

ROUTE_USER = "fluxrig-route"
ROUTE_SCHEMES = ("nats-route", "nats")
MIN_ROUTE_PASSWORD_CHARS = 16
ROUTE_TLS_TIMEOUT_S = 5
JETSTREAM_POLL_S = 0.25
# GET /api/v1/cluster asks JetStream about each stream with this timeout (a survivor answers
# within it while the cluster elects new leaders; a stream without quorum is shown as such).
STATUS_TIMEOUT_S = 2.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What a new node copies from an existing one (relative to the state dir; see seed_node).
SEED_FILES = ("cluster.key", os.path.join("certs", "ca.pem"), os.path.join("certs", "ca-key.pem"))


class ClusterError(FluxError):
    """The cluster cannot be joined or its JetStream did not come up; `what` names the part."""

    def __init__(self, message: str, what: str = ""):
        self.what = what
        super().__init__(message)


@dataclass(frozen=True)
class ClusterSpec:
    """What snake.py renders for a cluster member (all checked, paths resolved)."""

    name: str
    node_name: str
    host: str
    port: int
    routes: tuple[str, ...]
    replicas: int
    advertise: str = ""
    tls: dict | None = None  # cert_file, key_file, ca_file: route TLS with verify
    password: str = ""  # ROUTE_USER's password (memory, and the 0600 config file only)
    no_advertise: bool = False
    ready_timeout: float = 60.0

    def route_urls(self) -> list[str]:
        """The route URLs as nats-server dials them (with the route credentials when set)."""
        out = []
        for url in self.routes:
            u = urlsplit(url)
            auth = f"{ROUTE_USER}:{self.password}@" if self.password else ""
            out.append(f"nats-route://{auth}{u.hostname}:{u.port}")
        return out

    def peer_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every configured route: the only outbound peers of this node."""
        return [(urlsplit(u).hostname or "", urlsplit(u).port or 0) for u in self.routes]


def _parse_route(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    if u.scheme not in ROUTE_SCHEMES:
        raise ConfigError(f"route URL {url!r}: the scheme is nats-route:// (or nats://)", "cluster.routes")
    if u.username or u.password:
        raise ConfigError(
            f"route URL {url!r} holds credentials: put the password in cluster.route_password_file (0600)",
            "cluster.routes",
        )
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or not port:
        raise ConfigError(f"route URL {url!r} needs a host and a port (nats-route://host:6222)", "cluster.routes")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ConfigError(f"route URL {url!r}: nothing after host:port", "cluster.routes")
    return u.hostname, port


def check_cluster_values(values: dict) -> None:
    """ConfigError naming the key for a [cluster] section a member cannot run with."""
    c = values["cluster"]
    routes = split_urls(c["routes"])
    hosts = [_parse_route(u) for u in routes]
    for key in ("name", "node_name"):
        if c[key] and not _NAME.match(c[key]):
            raise ConfigError("letters, digits, '_', '.', '-' only (at most 64)", f"cluster.{key}")
    if not c["name"]:
        raise ConfigError("every node of one cluster needs the same name", "cluster.name")
    # This node plus the distinct peers it names (a list copied to every node includes itself).
    nodes = len(set(hosts)) + (0 if _names_self(hosts, c["port"]) else 1)
    if c["replicas"] > nodes:
        raise ConfigError(
            f"{c['replicas']} replicas need at least as many nodes; [cluster] names {nodes}", "cluster.replicas"
        )
    if not c["route_tls"] and not c["route_password_file"]:
        raise ConfigError(
            "routes must be authenticated: keep cluster.route_tls = true, or set cluster.route_password_file",
            "cluster.route_tls",
        )
    if bool(c["route_cert_file"]) != bool(c["route_key_file"]):
        raise ConfigError("set both cluster.route_cert_file and route_key_file, or neither", "cluster.route_key_file")
    for url in split_urls(c["client_urls"]):
        if not url.startswith(("tls://", "nats://")) or not urlsplit(url).port:
            raise ConfigError(
                f"{url!r}: a Snake URL is tls://host:port (nats:// only in plain text)", "cluster.client_urls"
            )
    if c["advertise"]:
        host, _, port = c["advertise"].rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("host:port", "cluster.advertise")


def _names_self(hosts: list[tuple[str, int]], port: int) -> bool:
    if not port:
        return False
    local = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    return any(p == port and h in local for h, p in hosts)


def read_route_password(path: str) -> str:
    """The route password from `path`, which must be a regular file of mode 0600 (or stricter)
    owned by this user, holding at least MIN_ROUTE_PASSWORD_CHARS characters."""
    key = "cluster.route_password_file"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file", key)
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is readable by group or others (mode {st.st_mode & 0o777:o}): chmod 600 it", key)
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user", key)
    with open(path, encoding="utf-8") as fh:
        value = fh.read().strip()
    if len(value) < MIN_ROUTE_PASSWORD_CHARS or any(c.isspace() or c in "\"'@:/\\" for c in value):
        raise ConfigError(
            f"the route password needs {MIN_ROUTE_PASSWORD_CHARS}+ characters, no space, quote, '@', ':' or '/' "
            "(e.g. `python3 -c 'import secrets; print(secrets.token_hex(24))'`)",
            key,
        )
    return value


def route_hosts(c, snake_advertise_host: str = "") -> list[str]:
    """Names and addresses this node's route certificate must carry: the ones peers dial it by
    (cluster.advertise, else snake.advertise_host, the listen address, this host's name)."""
    hosts = [snake_advertise_host] if snake_advertise_host else []
    if c.advertise:
        hosts.append(c.advertise.rpartition(":")[0])
    if c.host not in ("0.0.0.0", "::", ""):
        hosts.append(c.host)
    return hosts


def build_spec(cfg, state_dir: str, route_port: int | None = None) -> ClusterSpec:
    """The ClusterSpec of a clustered MixerConfig: route certificate (issued from the Snake's CA
    in <state_dir>/certs when not given), password file read. ConfigError / CertError."""
    c = cfg.cluster
    tls = None
    if c.route_tls:
        from .certs import ensure_route_leaf

        cert_dir = os.path.join(state_dir, "certs")
        ca_file = cfg.snake.tls_ca_file or os.path.join(cert_dir, "ca.pem")
        if c.route_cert_file:
            files = {"cert_file": c.route_cert_file, "key_file": c.route_key_file}
        else:
            files = ensure_route_leaf(cert_dir, route_hosts(c, cfg.snake.advertise_host))
        if not os.path.exists(ca_file):
            raise ConfigError(
                f"route TLS verifies peers against the CA {ca_file}, which is missing", "cluster.route_tls"
            )
        tls = dict(files, ca_file=ca_file)
    else:
        log.warning(
            "cluster.route_tls = false: routes to %s cross in PLAIN TEXT (password-checked only); "
            "JetStream replication and every message are readable on that network",
            c.routes,
        )
    password = read_route_password(c.route_password_file) if c.route_password_file else ""
    return ClusterSpec(
        name=c.name,
        node_name=c.node_name or socket.gethostname(),
        host=c.host,
        port=c.port if route_port is None else route_port,
        routes=tuple(split_urls(c.routes)),
        replicas=c.replicas,
        advertise=c.advertise,
        tls=tls,
        password=password,
        no_advertise=c.no_advertise,
        ready_timeout=c.ready_timeout,
    )


def _q(value: str) -> str:
    import json

    return json.dumps(value)


def render_cluster_block(spec: ClusterSpec) -> list[str]:
    """The `cluster { ... }` lines of nats-server.conf for this member."""
    lines = [
        "# Cluster member (fluxrig_mixer/cluster.py): routes to the configured peers only.",
        "cluster {",
        f"  name: {_q(spec.name)}",
        f"  listen: {_q(f'{spec.host}:{spec.port}')}",
    ]
    if spec.advertise:
        lines.append(f"  advertise: {_q(spec.advertise)}")
    if spec.no_advertise:
        lines.append("  no_advertise: true")
    if spec.password:
        lines += [
            "  authorization {",
            f"    user: {_q(ROUTE_USER)}",
            f"    password: {_q(spec.password)}",
            f"    timeout: {ROUTE_TLS_TIMEOUT_S}",
            "  }",
        ]
    if spec.tls:
        lines += [
            "  tls {",
            f"    cert_file: {_q(spec.tls['cert_file'])}",
            f"    key_file: {_q(spec.tls['key_file'])}",
            f"    ca_file: {_q(spec.tls['ca_file'])}",
            "    # Both ends present a certificate from the cluster CA.",
            "    verify: true",
            f"    timeout: {ROUTE_TLS_TIMEOUT_S}",
            "  }",
        ]
    lines.append("  routes: [")
    for url in spec.route_urls():
        lines.append(f"    {_q(url)}")
    lines += ["  ]", "}"]
    return lines


def seed_node(src_state_dir: str, dst_state_dir: str, *, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy what a node shares with the cluster (SEED_FILES, then `extra` relative paths) from
    an existing node's state dir into a new node's (created 0700, files 0600). An existing
    destination file is never replaced (a node that already has its own key keeps it and then
    signs passports Racks refuse: ClusterError says so). Returns the paths written."""
    written = []
    os.makedirs(os.path.join(dst_state_dir, "certs"), mode=0o700, exist_ok=True)
    for rel in (*SEED_FILES, *extra):
        src, dst = os.path.join(src_state_dir, rel), os.path.join(dst_state_dir, rel)
        if not os.path.exists(src):
            if rel.endswith("ca-key.pem"):
                continue  # an offline CA: the operator issues this node's certificates
            raise ClusterError(f"{src} is missing: start the first node once before seeding others", rel)
        if os.path.exists(dst):
            with open(src, "rb") as a, open(dst, "rb") as b:
                if a.read() != b.read():
                    raise ClusterError(f"{dst} exists and differs from {src}: this node belongs elsewhere", rel)
            continue
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        fd = os.open(dst + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
            shutil.copyfileobj(fh, out)
        os.replace(dst + ".tmp", dst)
        written.append(dst)
    return written


async def wait_jetstream(js, timeout: float) -> None:
    """Until the cluster's JetStream answers (a meta leader was elected: a quorum of nodes is
    up and routed). ClusterError after `timeout` seconds, naming the last answer."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            await js.account_info()
            return
        except Exception as exc:  # 503 "JetStream system temporarily unavailable", timeouts
            last = exc
        await asyncio.sleep(JETSTREAM_POLL_S)
    raise ClusterError(
        f"the cluster's JetStream did not answer within {timeout:.0f}s ({last}); a quorum of nodes must be up "
        "and their routes must connect (see nats-server.log of each node)",
        "jetstream",
    )


def _transient(exc: BaseException) -> bool:
    """A JetStream answer that a forming (or re-forming) cluster gives and that passes: no
    answer in time, 503 (no meta leader, no quorum), "insufficient resources / no suitable
    peers" while peers are still joining (err 10005, 10023), and "no response from stream" from
    a stream or bucket just created whose replicas have not elected a leader yet."""
    import nats
    import nats.js.errors

    transient = (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError,
                 nats.js.errors.NoStreamResponseError)  # fmt: skip
    if isinstance(exc, transient):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503 or getattr(exc, "err_code", None) in (10005, 10023, 10074)
    return False


async def retry_while_forming(op, timeout: float, what: str):
    """`await op()` again while the cluster answers with a transient error (see _transient),
    until `timeout` seconds; then ClusterError naming `what` and the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await op()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() >= deadline:
                if _transient(exc):
                    raise ClusterError(
                        f"{what}: the cluster's JetStream kept answering {exc!r} for {timeout:.0f}s "
                        "(a quorum of nodes must be up and routed; see each node's nats-server.log)",
                        what,
                    ) from None
                raise
            log.info("%s: cluster not ready yet (%r), retrying", what, exc)
        await asyncio.sleep(JETSTREAM_POLL_S)


class ClusterView:
    """What GET /api/v1/cluster shows of this node and the cluster's streams (routes_cluster.py):
    this node's name, the cluster name, the peer routes it was given, the replica count, and
    for each stream its leader, its replicas (current or lagging, by node name) and its
    message counts, from JetStream's own stream info (no state of ours)."""

    def __init__(self, spec: ClusterSpec, js, streams: tuple[str, ...], nc=None):
        self.spec = spec
        self._js = js
        self._nc = nc
        self.streams = streams

    async def step_down(self, stream: str) -> dict:
        """Ask `stream`'s leader to step down (a new one is elected among the current replicas);
        the stream's status afterwards. ClusterError for an unknown stream or a refusal."""
        import json

        from fluxrig.wire import subjects as S

        if stream not in self.streams:
            raise ClusterError(f"unknown stream {stream!r}; the Mixer's streams: {', '.join(self.streams)}", stream)
        try:
            reply = await self._nc.request(S.js_stream_leader_stepdown(stream), b"", timeout=STATUS_TIMEOUT_S * 2)
        except Exception as exc:  # no answer: no leader to step down (an election is on)
            raise ClusterError(f"{stream}: no answer to the step-down ({exc!r}); try again", stream) from None
        body = json.loads(reply.data or b"{}")
        if body.get("error"):
            raise ClusterError(
                f"{stream}: step-down refused: {body['error'].get('description', body['error'])}", stream
            )
        return await self._stream(stream)

    async def status(self) -> dict:
        out: dict = {
            "clustered": True,
            "cluster": self.spec.name,
            "node": self.spec.node_name,
            "routes": list(self.spec.routes),
            "replicas": self.spec.replicas,
            "route_tls": self.spec.tls is not None,
            "streams": {},
        }
        for name in self.streams:
            out["streams"][name] = await self._stream(name)
        return out

    async def _stream(self, name: str) -> dict:
        try:
            info = await asyncio.wait_for(self._js.stream_info(name), STATUS_TIMEOUT_S)
        except Exception as exc:
            return {"available": False, "error": str(exc) or type(exc).__name__}
        c = info.cluster
        peers = [{"node": c.leader, "leader": True, "current": True, "lag": 0}] if c and c.leader else []
        for p in (c.replicas or []) if c else []:
            peers.append({"node": p.name, "leader": False, "current": bool(p.current), "lag": p.lag or 0,
                          "offline": bool(p.offline)})  # fmt: skip
        st = info.state
        return {
            "available": bool(c and c.leader),
            "leader": c.leader if c else None,
            "replicas": info.config.num_replicas,
            "peers": peers,
            "messages": st.messages,
            "first_seq": st.first_seq,
            "last_seq": st.last_seq,
        }
