"""The Mixer process: wires the parts together and owns their lifecycle.

Start order (`Mixer.start`): state dir (0700) -> DuckDB registry -> cluster key -> bootstrap
and API tokens -> the Snake (nats-server child, users from the registry) -> the Mixer's own
bus connection and the two streams -> controller subscriptions (Hello, heartbeats, liveness
sweeper) -> telemetry ingest -> control API. `stop()` undoes it in reverse order and never
leaves nats-server running.

Secrets on disk, all mode 0600 in base.state_dir: `cluster.key` (back it up: it signs every
passport), `bootstrap-token` (given to Racks as snake.bootstrap_token), `api-token` (unless
api.auth_token is set). The bootstrap token is printed once, when it is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time

import nats

from fluxrig import systemd
from fluxrig.agent import subjects as S
from fluxrig.agent.agent import close_quietly
from fluxrig.errors import ConfigError, FluxError
from fluxrig.passport import ClusterKey

from ._version import __version__
from .config import MixerConfig
from .controller import Controller
from .ingest import TelemetryIngest
from .registry import Database, Registry
from .scenarios import ScenarioStore
from .snake import MIXER_USER, SnakeSupervisor

__all__ = ["Mixer", "load_or_create_secret", "ensure_streams"]

log = logging.getLogger("fluxrig.mixer")

TOKEN_BYTES = 32
DUPLICATE_WINDOW_S = 120.0


def load_or_create_secret(path: str) -> tuple[str, bool]:
    """(secret, created). Created with mode 0600 from the first byte."""
    try:
        with open(path) as fh:
            value = fh.read().strip()
        if value:
            return value, False
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(TOKEN_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value, True


async def ensure_streams(js, snake_cfg) -> None:
    """Create or update the two streams: flux-msg (guaranteed lane) and flux-telemetry."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    s = snake_cfg
    for name, subjects_, max_age, max_bytes in (
        (S.STREAM_MSG, ["flux.msg.>"], s.stream_max_age, s.stream_max_bytes),
        (S.STREAM_TELEMETRY, ["flux.telemetry.>"], s.telemetry_max_age, s.telemetry_max_bytes),
    ):
        config = StreamConfig(
            name=name,
            subjects=subjects_,
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=max_age,
            max_bytes=max_bytes,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=1,
        )
        try:
            await js.stream_info(name)
            await js.update_stream(config)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)


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
        self.ingest: TelemetryIngest | None = None
        self.nc = None
        self.js = None
        self.api_token: str | None = None
        self.bootstrap_token: str = ""
        self.api_port: int = cfg.api.port
        self.started_at = time.time()
        self._api_server = None
        self._api_task: asyncio.Task | None = None
        self._stop_event = asyncio.Event()

    # -- start ---------------------------------------------------------------------------------

    def _tokens(self) -> None:
        self.bootstrap_token, created = load_or_create_secret(os.path.join(self.state_dir, "bootstrap-token"))
        if created:
            self.announce(
                "\n=== fluxrig-mixer: bootstrap token created (shown once) ===\n"
                f"  {self.bootstrap_token}\n"
                "Give it to Racks in fluxrig.toml:\n"
                "  [snake]\n"
                f'  url = "{self.snake_url_hint()}"\n'
                f'  bootstrap_token = "{self.bootstrap_token}"\n'
                f'  mixer_public_key = "{self.key.public_hex}"\n'
                f"It is kept in {os.path.join(self.state_dir, 'bootstrap-token')} (mode 0600).\n"
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
        scheme = "tls" if self.cfg.snake.tls_cert_file else "nats"
        port = self.snake.port if self.snake else self.cfg.snake.port
        return f"{scheme}://{host}:{port}"

    def _snake_tls(self) -> dict | None:
        s = self.cfg.snake
        if not s.tls_cert_file:
            return None
        return {"cert_file": s.tls_cert_file, "key_file": s.tls_key_file, "ca_file": s.tls_ca_file, "verify": s.tls_verify}

    def _client_tls(self) -> ssl.SSLContext | None:
        s = self.cfg.snake
        if not s.tls_cert_file:
            return None
        ctx = ssl.create_default_context(cafile=s.tls_ca_file or None)
        if not s.tls_ca_file:
            # The Mixer dials its own child on loopback; the certificate may name other hosts.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def start(self) -> None:
        cfg = self.cfg
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.db = Database(os.path.join(self.state_dir, "mixer.duckdb"))
        self.registry = Registry(self.db, cfg.enrollment.heartbeat_interval, cfg.enrollment.offline_after)
        self.scenarios = ScenarioStore(self.db)
        self.key = ClusterKey.load_or_create(os.path.join(self.state_dir, "cluster.key"))
        self.snake = SnakeSupervisor(
            state_dir=self.state_dir,
            host=cfg.snake.host,
            port=cfg.snake.port,
            binary=cfg.snake.binary,
            tls=self._snake_tls(),
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
            wait_user=lambda user, password: self.snake.wait_user(user, password, tls=self._client_tls()),
        )
        try:
            await self.snake.start(self.controller.bus_users())
            self.nc = await nats.connect(
                self.snake.url,
                user=MIXER_USER,
                password=self.snake.mixer_password,
                tls=self._client_tls(),
                name="fluxrig-mixer",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=self._bus_error,
            )
            self.js = self.nc.jetstream()
            await self._ensure_streams()
            await self.controller.attach(self.nc)
            t = cfg.telemetry
            self.ingest = TelemetryIngest(
                self.db,
                batch_max_messages=t.batch_max_messages,
                batch_max_bytes=t.batch_max_bytes,
                flush_interval=t.flush_interval,
                retention=t.retention,
                retention_interval=t.retention_interval,
            )
            await self.ingest.start(self.js)
            await self._start_api()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "fluxrig-mixer %s ready: API on %s:%d, Snake on %s (state %s)",
            __version__, cfg.api.host, self.api_port, self.snake.url, self.state_dir,
        )

    async def _bus_error(self, exc) -> None:
        log.debug("mixer bus: %s", exc)

    async def _ensure_streams(self) -> None:
        await ensure_streams(self.js, self.cfg.snake)

    async def _start_api(self) -> None:
        import uvicorn

        from .api import create_app

        app = create_app(self)
        cfg = self.cfg.api
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every keep-alive response waits ~40 ms (Nagle meets
        # delayed ACK, because uvicorn writes headers and body separately).
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            raise FluxError(f"cannot listen on {cfg.host}:{cfg.port} for the API: {exc.strerror}") from None
        sock.listen(512)
        sock.setblocking(False)
        self.api_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=cfg.tls_cert_file or None,
            ssl_keyfile=cfg.tls_key_file or None,
        )

        class _Server(uvicorn.Server):
            # The Mixer owns the signals; uvicorn must not install its own handlers.
            @contextlib.contextmanager
            def capture_signals(self):
                yield

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
        scheme = "https" if self.cfg.api.tls_cert_file else "http"
        host = "127.0.0.1" if self.cfg.api.host in ("0.0.0.0", "::", "") else self.cfg.api.host
        return f"{scheme}://{host}:{self.api_port}"

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self._api_server is not None:
            self._api_server.should_exit = True
            if self._api_task is not None:
                try:
                    await asyncio.wait_for(self._api_task, 5)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    self._api_task.cancel()
            self._api_server = None
        if self.ingest is not None:
            await self.ingest.stop()
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
