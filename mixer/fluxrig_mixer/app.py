"""The Mixer process: wires the parts together and owns their lifecycle.

Start order (`Mixer.start`): state dir (0700) -> DuckDB registry -> cluster key -> bootstrap
and API tokens -> the Snake (nats-server child, users from the registry) -> the Mixer's own
bus connection and the two streams -> controller subscriptions (Hello, heartbeats, liveness
sweeper) -> telemetry ingest -> control API. `stop()` undoes it in reverse order and never
leaves nats-server running.

Secrets on disk, all mode 0600 in base.state_dir (0700; forced on every start, umask 077):
`cluster.key` (back it up: it signs every passport), `enroll-bundle` (the first-start token's
enrollment bundle; tokens themselves are stored hashed in `enroll-tokens.json`), `api-token`
(unless api.auth_token is set), `certs/` (the Snake's CA and certificates, created on first
start: TLS is on unless snake.insecure_plaintext). No bus secret exists: Racks and the Mixer
authenticate to the Snake with NKeys, the config holds public keys only. Banners print paths
and public values (CA fingerprint, Mixer key), never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time
from typing import TYPE_CHECKING

import nats

from fluxrig import systemd
from fluxrig.aiotools import close_quietly
from fluxrig.errors import ConfigError, FluxError
from fluxrig.fileutil import secure_tree, write_private_atomic
from fluxrig.net.addr import is_loopback
from fluxrig.passport import ClusterKey

from ._version import __version__
from .commands import CommandSender
from .config import MixerConfig
from .controller import Controller
from .ingest import TelemetryIngest
from .queries import TelemetryQueries
from .registry import Database, Registry
from .scenarios import ScenarioStore
from .snake import SnakeSupervisor
from .streams import DUPLICATE_WINDOW_S, ensure_streams  # stream definitions: streams.py
from .telemetry_store import TelemetryStore, open_store

if TYPE_CHECKING:  # the HTTP stack is imported only when the API starts
    from .api.services import MixerServices

__all__ = [
    "Mixer",
    "load_or_create_secret",
    "new_secret",
    "ensure_streams",
    "TOKEN_BYTES",
    "DUPLICATE_WINDOW_S",
]

log = logging.getLogger("fluxrig.mixer")

TOKEN_BYTES = 32
SLOW_STOP_S = 10.0  # a slower stop is a warning: the unit's TimeoutStopSec kills one that runs on


def new_secret() -> str:
    """A random URL-safe secret that never begins with '-': given after an option on a
    command line (`--api-token X`), such a value is taken for an option."""
    while (value := secrets.token_urlsafe(TOKEN_BYTES)).startswith("-"):
        pass
    return value


def load_or_create_secret(path: str) -> tuple[str, bool]:
    """(secret, created). Created with mode 0600 from the first byte."""
    try:
        with open(path) as fh:
            value = fh.read().strip()
        if value:
            return value, False
    except FileNotFoundError:
        pass
    value = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value, True


class Mixer:
    def __init__(self, cfg: MixerConfig, announce=None):
        self.cfg = cfg
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self.state_dir = os.path.abspath(cfg.base.state_dir)
        self.db: Database | None = None
        self.registry: Registry | None = None
        self.scenarios: ScenarioStore | None = None
        self.key: ClusterKey | None = None
        self.snake: SnakeSupervisor | None = None
        self.controller: Controller | None = None
        self.commands: CommandSender | None = None
        self.ingest: TelemetryIngest | None = None
        self.telemetry_store: TelemetryStore | None = None
        self.nc = None
        self.js = None
        self.api_token: str | None = None
        self.bootstrap_token: str = ""
        self.api_port: int = cfg.api.port
        self.tls: dict | None = None
        self.tokens = None
        self.bundle_path = ""
        self.ca_pem = ""
        self.ca_sha256 = ""
        self.started_at = time.time()
        self._api_server = None
        self._shared_identity = None  # api/shared_identity.py, once the API runs on a bus
        self._shared_audit = None  # api/shared_audit.py, likewise
        self._api_task: asyncio.Task | None = None
        self._stop_event = asyncio.Event()

    # -- start ---------------------------------------------------------------------------------

    def _tokens(self) -> None:
        from fluxrig.wire.bundle import BundleError, read_bundle

        from .tokens import TokenStore, first_token_id

        self.tokens = TokenStore(self.state_dir)
        self.bundle_path = os.path.join(self.state_dir, "enroll-bundle")
        e = self.cfg.enrollment
        first = not self.tokens.exists
        if first:
            self.bootstrap_token, _ = self.tokens.create(
                uses=e.first_token_uses,
                ttl=e.first_token_ttl or None,
                token_id=first_token_id(self._node_name() if self.cfg.clustered else None),
            )
        else:
            try:  # the first-start bundle is rewritten every start (the port or CA may change)
                self.bootstrap_token = read_bundle(self.bundle_path).token
            except BundleError:
                self.bootstrap_token = ""
        if self.tls is not None and (first or os.path.exists(self.bundle_path)):
            self.write_bundle(self.bundle_path, self.bootstrap_token)
        if first:
            # Paths and public values only: the token never goes to a terminal or the journal.
            uses = f"{e.first_token_uses} use(s)" if e.first_token_uses else "unlimited uses"
            self.announce(
                "\n=== fluxrig-mixer: first start ===\n"
                f"Enrollment bundle (Snake URLs, CA, Mixer key, a token good for {uses}) in "
                f"{self.bundle_path} (mode 0600).\n"
                "Copy it to a Rack and set in its fluxrig.toml:\n"
                "  [snake]\n"
                '  enrollment_bundle = "/path/to/enroll-bundle"\n'
                f"Snake CA SHA-256 {self.ca_sha256 or '-'}; Mixer key {self.key.public_hex}\n"
                "More tokens and bundles: `fluxrig-mixer tokens create --help`.\n"
            )
        api = self.cfg.api
        if api.auth_token:
            self.api_token = api.auth_token
        elif api.auth_disabled_dangerously:
            self.api_token = None
            log.warning("api.auth_disabled_dangerously = true: every API route is open to anyone who can reach it")
        else:
            self.api_token, created = load_or_create_secret(os.path.join(self.state_dir, "api-token"))
            if created:
                self.announce(f"API token written to {os.path.join(self.state_dir, 'api-token')} (mode 0600)")
        if self.api_token is None and not api.auth_disabled_dangerously:
            raise ConfigError("refusing to start the API without a token", "api.auth_token")

    def snake_url_hint(self) -> str:
        host = self.cfg.snake.advertise_host or socket.gethostname()
        scheme = "nats" if self.tls is None else "tls"
        port = self.snake.port if self.snake else self.cfg.snake.port
        return f"{scheme}://{host}:{port}"

    # -- TLS (on by default) -------------------------------------------------------------------

    def _prepare_tls(self) -> None:
        """self.tls: the Snake's certificate files, created on first start (certs.ensure_certs)
        unless the operator names their own; None only with snake.insecure_plaintext."""
        from .certs import MIXER_CLIENT, ca_fingerprint, cert_paths, ensure_certs, issue_client_cert

        s = self.cfg.snake
        if s.insecure_plaintext:
            log.warning(
                "INSECURE: snake.insecure_plaintext = true: the Snake listens in PLAIN TEXT on %s:%s; enrollment "
                "tokens, passports and payloads cross the network readable. Remove it to get TLS.",
                s.host,
                s.port,
            )
            self.tls = None
            return
        cert_dir = os.path.join(self.state_dir, "certs")
        defaults = cert_paths(cert_dir)
        if s.tls_cert_file:
            paths = dict(defaults, cert_file=s.tls_cert_file, key_file=s.tls_key_file)
            paths["ca_file"] = s.tls_ca_file or (defaults["ca_file"] if os.path.exists(defaults["ca_file"]) else "")
        else:
            hosts = [h for h in (s.advertise_host, s.host) if h and h not in ("0.0.0.0", "::")]
            paths, created = ensure_certs(cert_dir, hosts, cluster_name=self.cfg.base.name)
            if created:
                self.announce(f"Snake TLS: a CA and a server certificate were created in {cert_dir}")
            if s.tls_ca_file:
                paths["ca_file"] = s.tls_ca_file
        self.tls = {
            "cert_file": paths["cert_file"],
            "key_file": paths["key_file"],
            "ca_file": paths["ca_file"],
            "verify": s.tls_verify,
        }
        if s.tls_verify:
            if not paths["ca_file"]:
                raise ConfigError("tls_verify needs the CA of client certificates", "snake.tls_ca_file")
            client = (defaults["client_cert_file"], defaults["client_key_file"])
            if not os.path.exists(client[0]):
                try:
                    issue_client_cert(cert_dir, MIXER_CLIENT)
                except FluxError as exc:
                    raise ConfigError(
                        f"tls_verify: the Mixer needs its own client certificate {client[0]} ({exc}); "
                        "issue it with `fluxrig-mixer certs init --client mixer-client`",
                        "snake.tls_verify",
                    ) from None
            self.tls["client_cert_file"], self.tls["client_key_file"] = client
        self.ca_pem = ""
        if paths["ca_file"]:
            with open(paths["ca_file"], encoding="ascii") as fh:
                self.ca_pem = fh.read()
            self.ca_sha256 = ca_fingerprint(self.ca_pem)

    def _snake_tls(self) -> dict | None:
        return self.tls

    def _client_tls(self) -> ssl.SSLContext | None:
        """The Mixer's own bus client's TLS context (snake.SnakeSupervisor.client_tls)."""
        return self.snake.client_tls() if self.snake is not None else None

    # -- enrollment bundles ----------------------------------------------------------------------

    def bundle_urls(self) -> list[str]:
        """The Snake URLs a bundle names: loopback when the Snake listens only there, else
        snake.advertise_host (or this host's name)."""
        scheme = "nats" if self.tls is None else "tls"
        port = self.snake.port if self.snake else self.cfg.snake.port
        host = self.cfg.snake.host
        if self.cfg.clustered and self.cfg.cluster.client_urls:  # issue 14: every node's Snake
            from fluxrig.settings import split_urls

            return split_urls(self.cfg.cluster.client_urls)
        if host in ("127.0.0.1", "localhost", "::1"):
            return [f"{scheme}://{'127.0.0.1' if host != '::1' else '[::1]'}:{port}"]
        return [f"{scheme}://{self.cfg.snake.advertise_host or socket.gethostname()}:{port}"]

    def enrollment_bundle(self, token: str, urls: list[str] | None = None) -> str:
        """The bundle string for `token` (wire/bundle.py): Snake URLs, CA, Mixer key, token."""
        from fluxrig.wire.bundle import Bundle, encode_bundle

        if not self.ca_pem:
            raise FluxError(
                "no CA to put in an enrollment bundle (snake.insecure_plaintext, or an operator certificate "
                "without snake.tls_ca_file)"
            )
        return encode_bundle(
            Bundle(
                tuple(urls or self.bundle_urls()),
                self.ca_pem,
                self.ca_sha256,
                (self.key.public_hex,),
                token,
                self.cfg.base.name,
            )
        )

    def write_bundle(self, path: str, token: str, urls: list[str] | None = None) -> str:
        """Write the bundle for `token` to `path` (0600); returns `path`."""
        write_private_atomic(path, (self.enrollment_bundle(token, urls) + "\n").encode())
        return path

    async def start(self) -> None:
        cfg = self.cfg
        # Issue 12 item 6: nothing written from here on is group/other-readable, and a state
        # dir made by another tool (`certs init`, a restore) is forced to 0700/0600 every start.
        os.umask(0o077)
        fixed = secure_tree(self.state_dir)
        if fixed:
            log.warning("state dir %s: %d file/directory modes tightened to 0600/0700", self.state_dir, fixed)
        self.db = Database(os.path.join(self.state_dir, "mixer.duckdb"))
        self.registry = Registry(self.db, cfg.enrollment.heartbeat_interval, cfg.enrollment.offline_after)
        self.scenarios = ScenarioStore(self.db, self._scenario_checker())
        # The telemetry store before anything runs: an unreachable archive stops start-up here.
        self.telemetry_store = open_store(cfg, self.db)
        self.key = ClusterKey.load_or_create(os.path.join(self.state_dir, "cluster.key"))
        self._prepare_tls()
        cluster_spec, advertise = self._cluster_spec()  # None on a single node (cluster.py)
        self.snake = SnakeSupervisor(
            cluster=cluster_spec,
            advertise_host=advertise,
            state_dir=self.state_dir,
            host=cfg.snake.host,
            port=cfg.snake.port,
            binary=cfg.snake.binary,
            tls=self._snake_tls(),
            insecure_plaintext=cfg.snake.insecure_plaintext,
            ready_timeout=cfg.snake.ready_timeout,
            restart_backoff=cfg.snake.restart_backoff,
            restart_backoff_max=cfg.snake.restart_backoff_max,
            stop_timeout=cfg.snake.stop_timeout,
            debug=cfg.logging.level == "debug",
        )
        self._tokens()
        self.controller = Controller(
            registry=self.registry,
            scenarios=self.scenarios,
            key=self.key,
            bootstrap_token=self.bootstrap_token,
            mixer_name=cfg.base.name,
            auto_adopt=cfg.enrollment.auto_adopt,
            heartbeat_interval=cfg.enrollment.heartbeat_interval,
            passport_ttl=cfg.enrollment.passport_ttl,
            reload_users=self.snake.reload,
            wait_reloaded=self.snake.wait_reloaded,
            tokens=self.tokens,
            hello_rate=cfg.enrollment.hello_rate,
            **self._shared_state_options(),
        )
        try:
            await self.snake.start(self.controller.bus_users())
            self.nc = await nats.connect(
                self.snake.url,
                **self.snake.client_options(),
                name="fluxrig-mixer",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=self._bus_error,
            )
            self.js = self.nc.jetstream()
            self.commands = CommandSender(self.registry, self.key, self.nc)
            self.controller.commands = self.commands  # one kill-state store for API and heartbeats
            await self._ensure_streams()
            await self.controller.attach(self.nc)
            t = cfg.telemetry
            # archive (issue 14 item 5): a cluster node's own consumer, or one shared by the nodes
            from .ingest_cluster import ingest_role

            role = ingest_role(cfg, self.telemetry_store.name)
            self.ingest = TelemetryIngest(
                self.telemetry_store,
                durable=role.durable,
                shared=role.shared,
                batch_max_messages=t.batch_max_messages,
                batch_max_bytes=t.batch_max_bytes,
                retention=t.retention,
                retention_interval=t.retention_interval,
                max_incarnations=t.max_incarnations,
                rack_max_rows=t.rack_max_rows,
                rack_max_bytes=t.rack_max_bytes,
                quota_window=t.quota_window,
                outage_backoff_max=t.outage_backoff_max,
            )
            if cfg.clustered:  # its consumer and sources bucket (R3) may have no leader yet
                from .cluster import retry_while_forming

                await retry_while_forming(lambda: self.ingest.start(self.js), cfg.cluster.ready_timeout, "ingest")
            else:
                await self.ingest.start(self.js)
            await self._start_api()
        except BaseException:
            await self.stop()
            raise
        # The start-up heap (FastAPI, pydantic, DuckDB's module, the registry) moves to the
        # permanent generation: a full collection then walks only what was made since. Measured
        # under the guard test's attacks: a gen-2 pass over it held the loop 150-250 ms
        # (a heartbeat p99 of 150 ms against 12 ms without it). api/guard.py has the rest.
        gc.collect()
        gc.freeze()
        log.info(
            "fluxrig-mixer %s ready: API on %s:%d, Snake on %s (state %s)",
            __version__,
            cfg.api.host,
            self.api_port,
            self.snake.url,
            self.state_dir,
        )

    def _shared_state_options(self) -> dict:
        """This node's name, the KV replica count and how long to wait for a forming cluster
        (issue 14): one code path, R1 buckets on a single node's own nats-server."""
        from .streams import replicas_for

        r = self.cfg.rollout
        waves = {"wave_size": r.wave_size, "max_failure_ratio": r.max_failure_ratio, "wave_timeout": r.wave_timeout}
        if not self.cfg.clustered:
            return {"node": self.cfg.base.name, "replicas": replicas_for(self.cfg), **waves}
        node = self._node_name()
        return {"node": node, "replicas": replicas_for(self.cfg), "ready_timeout": self.cfg.cluster.ready_timeout,
                **waves}  # fmt: skip

    def _node_name(self) -> str:
        """This node's server name in a cluster (cluster.build_spec uses the same)."""
        return self.cfg.cluster.node_name or socket.gethostname()

    def _scenario_checker(self):
        """API scenario documents are parsed in a child with these budgets (parse_worker.py)."""
        from .parse_worker import ScenarioChecker

        api = self.cfg.api
        return ScenarioChecker(
            timeout=api.scenario_check_timeout,
            memory_bytes=api.scenario_check_memory_mb * 1024 * 1024,
            max_bytes=api.max_import_bytes,
        )

    def services(self) -> MixerServices:
        """What the control API may use (api/services.py); valid once start() has begun the API."""
        from .api.services import MixerServices

        return MixerServices(
            config=self.cfg,
            registry=self.registry,
            scenarios=self.scenarios,
            controller=self.controller,
            commands=self.commands,
            queries=self.telemetry_store.queries if self.telemetry_store else TelemetryQueries(self.db),
            ingest=self.ingest,
            snake=self.snake,
            public_key_hex=self.key.public_hex,
            api_token=self.api_token,
            started_at=self.started_at,
            cluster=self._cluster_view(),
        )

    def _cluster_view(self):
        """GET /api/v1/cluster's view (cluster.ClusterView); None on a single node."""
        if self.snake is None or self.snake.cluster is None or self.js is None:
            return None
        from fluxrig.wire import subjects as S

        from .cluster import ClusterView

        return ClusterView(self.snake.cluster, self.js, (S.STREAM_MSG, S.STREAM_TELEMETRY, S.STREAM_AUDIT), self.nc)

    async def _bus_error(self, exc) -> None:
        log.debug("mixer bus: %s", exc)

    async def _ensure_streams(self) -> None:
        from .streams import replicas_for

        if self.cfg.clustered:  # the cluster's JetStream needs a quorum first (cluster.py)
            from .cluster import retry_while_forming, wait_jetstream

            timeout = self.cfg.cluster.ready_timeout
            await wait_jetstream(self.js, timeout)
            replicas = replicas_for(self.cfg)
            await retry_while_forming(lambda: ensure_streams(self.js, self.cfg.snake, replicas), timeout, "streams")
            return
        await ensure_streams(self.js, self.cfg.snake, replicas_for(self.cfg))

    def _cluster_spec(self):
        """(ClusterSpec or None, client_advertise) for the Snake: issue 14, cluster.py."""
        if not self.cfg.clustered:
            return None, ""
        from .cluster import build_spec

        # Racks learn the other nodes from what each advertises: the name they can dial.
        return build_spec(self.cfg, self.state_dir), self.cfg.snake.advertise_host

    async def _start_shared_audit(self, audit) -> None:
        from .api.shared_audit import SharedAudit
        from .streams import audit_stream_config, replicas_for

        api = self.cfg.api
        config = audit_stream_config(api.audit_max_age, api.audit_max_bytes, replicas_for(self.cfg))
        shared = SharedAudit(audit, self._shared_state_options()["node"])
        if self.cfg.clustered:  # the stream (R3) may have no leader yet
            from .cluster import retry_while_forming

            await retry_while_forming(lambda: shared.start(self.js, config), self.cfg.cluster.ready_timeout, "audit")
        else:
            await shared.start(self.js, config)
        self._shared_audit = shared

    async def _start_api(self) -> None:
        import uvicorn

        from .api import create_app

        app = create_app(self.services())
        self._api_app = app  # stop() ends the console's live streams through it
        state = getattr(self.controller, "state", None)
        if state is not None:  # API tokens and logouts count on every node (api/shared_identity.py)
            from .api.shared_identity import SharedIdentity

            self._shared_identity = SharedIdentity(app.state.auth, state.b.operators)
            await self._shared_identity.start(self.cfg.cluster.ready_timeout)
        if self.js is not None:  # the audit trail every node answers the same (api/shared_audit.py)
            await self._start_shared_audit(app.state.audit)
        cfg = self.cfg.api
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every keep-alive response waits ~40 ms (Nagle meets
        # delayed ACK, because uvicorn writes headers and body separately).
        sock = socket.socket(
            socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            raise FluxError(f"cannot listen on {cfg.host}:{cfg.port} for the API: {exc.strerror}") from None
        sock.listen(512)
        sock.setblocking(False)
        self.api_port = sock.getsockname()[1]
        from .api.guard import bounded_tls_handshake, uvicorn_settings

        certfile, keyfile = cfg.tls_cert_file or None, cfg.tls_key_file or None
        if not self.cfg.api_https and not is_loopback(cfg.host):
            log.warning(
                "INSECURE: api.insecure_plaintext = true: the control API serves PLAIN HTTP on %s:%s; API tokens "
                "and console passwords cross the network readable. Remove it to get HTTPS.",
                cfg.host,
                cfg.port,
            )
        if self.cfg.api_https and not certfile:
            from .certs import ensure_server_leaf

            hosts = [h for h in (cfg.host,) if h not in ("0.0.0.0", "::", "")]
            leaf = ensure_server_leaf(os.path.join(self.state_dir, "certs"), "api", hosts)
            certfile, keyfile = leaf["cert_file"], leaf["key_file"]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            **uvicorn_settings(cfg),  # header/keep-alive timeouts, connection cap (api/guard.py)
        )

        handshake_timeout = cfg.header_timeout

        class _Server(uvicorn.Server):
            # The Mixer owns the signals; uvicorn must not install its own handlers.
            @contextlib.contextmanager
            def capture_signals(self):
                yield

            async def startup(self, sockets=None):
                with bounded_tls_handshake(asyncio.get_running_loop(), handshake_timeout):
                    await super().startup(sockets)

        self._api_server = _Server(config)
        self._api_task = asyncio.get_running_loop().create_task(self._api_server.serve(sockets=[sock]), name="api")
        for _ in range(200):
            if self._api_server.started or self._api_task.done():
                break
            await asyncio.sleep(0.01)
        if self._api_task.done():
            self._api_task.result()

    @property
    def api_url(self) -> str:
        scheme = "https" if self.cfg.api_https else "http"
        host = "127.0.0.1" if self.cfg.api.host in ("0.0.0.0", "::", "") else self.cfg.api.host
        return f"{scheme}://{host}:{self.api_port}"

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        t0 = time.monotonic()
        await self._stop_parts()
        took = time.monotonic() - t0
        (log.warning if took > SLOW_STOP_S else log.info)("mixer stopped in %.1fs", took)

    async def _stop_parts(self) -> None:
        if self._api_server is not None:
            # The console's server-sent event streams never end by themselves: end them first.
            feed = getattr(getattr(getattr(self, "_api_app", None), "state", None), "feed", None)
            if feed is not None:
                feed.close()
            self._api_server.should_exit = True
            if self._api_task is not None:
                try:
                    await asyncio.wait_for(self._api_task, 5)
                except (TimeoutError, asyncio.CancelledError, Exception):
                    self._api_task.cancel()
            self._api_server = None
        if self._shared_identity is not None:
            await self._shared_identity.stop()
            self._shared_identity = None
        if self._shared_audit is not None:
            await self._shared_audit.stop()
            self._shared_audit = None
        if self.ingest is not None:
            await self.ingest.stop()  # closes the telemetry store too
        elif self.telemetry_store is not None:
            self.telemetry_store.close()
        self.telemetry_store = None
        if self.controller is not None:
            await self.controller.detach()
            try:
                self.registry.flush_liveness()
            except Exception:
                pass
        if self.nc is not None:
            await close_quietly(self.nc, 5.0)
            self.nc = None
        if self.snake is not None:
            await self.snake.stop()
        if self.scenarios is not None:
            self.scenarios.checker.close()  # the spare scenario-parse child (parse_worker.py)
        if self.db is not None:
            self.db.close()
            self.db = None

    def request_stop(self) -> None:
        self._stop_event.set()

    async def activate_file(self, path: str) -> None:
        """Import and activate a scenario file (the `--scenario` flag)."""
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        stored, _ = self.scenarios.import_text(text, "toml" if path.endswith(".toml") else "yaml")
        await self.controller.activate_scenario(stored)

    async def run(self, startup_scenario: str | None = None) -> int:
        """Start, wait for SIGINT/SIGTERM, stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        await self.start()
        if startup_scenario:
            try:
                await self.activate_file(startup_scenario)
            except BaseException:
                await self.stop()
                raise
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self.announce(
            f"fluxrig-mixer ready: API {self.api_url} (OpenAPI at /docs), Snake {self.snake.url}, "
            f"state {self.state_dir}. Ctrl-C stops."
        )
        systemd.ready(f"API {self.api_url}, Snake {self.snake.url}")
        watchdog = loop.create_task(self._watchdog()) if systemd.watchdog_interval() else None
        try:
            await self._stop_event.wait()
        finally:
            systemd.stopping()
            if watchdog is not None:
                watchdog.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            log.info("stopping")
            await self.stop()
        return 0

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half of WatchdogSec while the event loop is alive."""
        period = systemd.watchdog_interval() or 10.0
        while True:
            systemd.watchdog()
            await asyncio.sleep(period)
