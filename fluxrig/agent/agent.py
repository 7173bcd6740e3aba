"""RackAgent: the Rack's side of the control plane (enrollment, passport, heartbeats, reload).

Contract with the runtime. The runtime builds `RackAgent(config, apply, ...)` and awaits
`start()`; `apply(doc: dict, version: str)` is awaited with a scenario projection taken from
a passport that verified, and must raise to refuse it (the message of the exception becomes
the `rejected` reason shown by the Mixer). Optional callbacks: `on_shutdown(reason)`,
`on_log_level(level)`, `on_status(status)`, `stats()` -> dict sent with each heartbeat,
`on_command(verb, data)` for the kill switch verbs (S.CTRL_COMMANDS): the raw signed command,
verified by the callee (fluxrig/killswitch.py); a heartbeat follows at once so the Mixer
learns the outcome. `reapply()` applies the passport's scenario again (after a revive).

Sovereign continuity. At start the agent loads the stored passport (`<state_dir>/rack.flux`)
and, if it verifies against the pinned key and carries a scenario, applies it at once,
before any network: the hot path never waits on the Mixer or the Snake. Connection loss only
pauses heartbeats; the running scenario stays.

Lifecycle.
1. No passport: connect as the shared `enroll` user, send Hello with the bootstrap token and
   a one-use X25519 key, retry every `enrollment_interval`; `denied` is logged and retried
   after `enrollment_timeout` (the token may be fixed meanwhile). The reply's passport is
   unsealed, verified (pinning the Mixer key on first use) and stored.
2. With a passport: connect as the Rack's own bus user (its inbox prefix `_INBOX_<rack>`),
   subscribe `flux.ctrl.<rack>.>`, heartbeat every interval. A heartbeat reply or a control
   message may carry a newer passport: older or equal serials are ignored (no replay), a
   changed name or bus user restarts the session, status `removed` wipes the passport and
   re-enrolls, a new scenario version is applied and reported on the next heartbeat (sent
   at once).
3. Credentials refused `AUTH_FAILURES_BEFORE_REENROLL` times over at least
   `AUTH_REVOKED_AFTER_S` while the server is reachable: the Mixer no longer knows this Rack,
   so wipe and enroll again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field

from ..aiotools import cancel_and_wait
from .. import _version
from ..errors import EnrollmentDenied, FluxError, PassportError
from ..passport import Passport, PassportStore, parse_public_key
from . import protocol as P
from . import subjects as S
from .telemetry import SRC_HEADER

__all__ = ["AgentConfig", "RackAgent", "AUTH_FAILURES_BEFORE_REENROLL", "close_quietly"]

log = logging.getLogger("fluxrig.agent")

AUTH_FAILURES_BEFORE_REENROLL = 5
# ...spread over at least this long: a just-enrolled Rack may dial before the Snake's reload.
AUTH_REVOKED_AFTER_S = 5.0
SESSION_RECONNECT_ATTEMPTS = 5
CLOSE_TIMEOUT_S = 2.0
# Level names the Mixer sends -> logging levels ("trace" is below DEBUG, as in fluxrig.logs).
LOG_LEVELS = {"trace": 5, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
RECONNECT_BACKOFF_MAX_S = 10.0
MIN_HEARTBEAT_S = 0.05
REQUEST_TIMEOUT_MAX_S = 5.0


@dataclass
class AgentConfig:
    """What the agent needs from fluxrig.toml (see `from_config`)."""

    snake_url: str
    bootstrap_token: str = ""
    state_dir: str = "./data"
    state_file: str = "rack.flux"
    name: str = ""
    mixer_public_keys: list = field(default_factory=list)  # 32-byte keys; empty = trust on first use
    heartbeat_interval: float = 30.0
    enrollment_interval: float = 2.0
    enrollment_timeout: float = 15.0
    connect_timeout: float = 10.0
    reconnect_wait: float = 1.0
    root_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    labels: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg, labels: dict | None = None) -> "AgentConfig":
        """From a loaded `fluxrig.config.Config` (sections base, rack, snake)."""
        keys = [parse_public_key(k) for k in (cfg.snake.mixer_public_key, cfg.snake.mixer_public_key_next) if k]
        return cls(
            snake_url=cfg.snake.url,
            bootstrap_token=cfg.snake.bootstrap_token,
            state_dir=cfg.base.state_dir,
            state_file=cfg.base.state_file,
            name=cfg.base.name,
            mixer_public_keys=keys,
            heartbeat_interval=cfg.rack.heartbeat_interval,
            enrollment_interval=cfg.rack.enrollment_interval,
            enrollment_timeout=cfg.rack.enrollment_timeout,
            connect_timeout=cfg.snake.connect_timeout,
            reconnect_wait=cfg.snake.reconnect_wait,
            root_ca_file=cfg.snake.root_ca_file,
            tls_cert_file=cfg.snake.tls_cert_file,
            tls_key_file=cfg.snake.tls_key_file,
            labels=dict(labels or {}),
        )


class _SessionEnd(Exception):
    """Internal: leave the current bus session (identity changed, removed, stopping)."""


class RackAgent:
    def __init__(self, config: AgentConfig, apply, *, on_shutdown=None, on_log_level=None, on_status=None, stats=None,
                 on_command=None):
        if not config.snake_url:
            raise FluxError("snake.url is empty: a standalone Rack has no agent")
        self.config = config
        self._apply_cb = apply
        self._on_shutdown = on_shutdown
        self._on_log_level = on_log_level
        self._on_status = on_status
        self._stats = stats
        self._on_command = on_command
        self.store = PassportStore(config.state_dir, config.state_file, list(config.mixer_public_keys))
        self.passport: Passport | None = None
        self.applied_version = ""
        self.apply_state = "none"
        self.apply_reason = ""
        self.nc = None
        self.js = None
        self.started = time.monotonic()
        self.denials = 0
        self.last_error = ""
        self._heartbeat_interval = config.heartbeat_interval
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._beat_now = asyncio.Event()
        self._session_end = asyncio.Event()
        self._auth_failures = 0
        self._auth_failing_since = 0.0
        self._apply_lock = asyncio.Lock()
        self.connected = asyncio.Event()

    # -- public ----------------------------------------------------------------------------

    @property
    def rack_name(self) -> str | None:
        return self.passport.rack_name if self.passport else None

    @property
    def status(self) -> str:
        return self.passport.status if self.passport else "unenrolled"

    async def start(self) -> None:
        """Load and apply the stored passport (offline-capable), then run in the background."""
        self._stopping = False
        try:
            self.passport = self.store.load()
        except PassportError as exc:
            log.error("stored passport refused, enrolling again: %s", exc)
            self.passport = None
        if self.passport is not None:
            log.info("passport: rack %s (%s), status %s, scenario %s",
                     self.passport.rack_name, self.passport.rack_id, self.passport.status,
                     self.passport.scenario_version or "none")
            await self._maybe_apply(self.passport)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rack-agent")

    async def stop(self) -> None:
        self._stopping = True
        self._session_end.set()
        await cancel_and_wait(self._task)
        self._task = None
        await self._close_nc()

    async def publish_telemetry(
        self, kind: str, batch: bytes, msg_id: str | None = None, timeout: float = 5.0, src: str = ""
    ):
        """Publish one encoded telemetry batch (fluxrig.agent.telemetry) to JetStream and return
        the PubAck; raises when not connected or not acknowledged (the caller keeps the records
        in its WAL). `src` names the records' source incarnation (the WAL id)."""
        if self.js is None or self.passport is None or not self.connected.is_set():
            raise FluxError("not connected to the Snake")
        headers = {}
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        if src:
            headers[SRC_HEADER] = src
        return await self.js.publish(
            S.telemetry(self.passport.rack_name, kind), batch, timeout=timeout, headers=headers or None
        )

    # -- main loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            # Also when cancelled without stop(): never leave a nats-py client running behind.
            await self._close_nc()

    async def _loop(self) -> None:
        backoff = self.config.reconnect_wait
        while not self._stopping:
            try:
                if self.passport is None:
                    log.debug("enrolling with the bootstrap token")
                    await self._enroll()
                    backoff = self.config.reconnect_wait
                    continue
                await self._session(self.passport)
                backoff = self.config.reconnect_wait
            except asyncio.CancelledError:
                raise
            except EnrollmentDenied as exc:
                self.denials += 1
                self.last_error = str(exc)
                log.error("%s; retrying in %.0fs (check snake.bootstrap_token)", exc, self.config.enrollment_timeout)
                await asyncio.sleep(self.config.enrollment_timeout)
            except Exception as exc:
                self.last_error = str(exc)
                log.warning("snake session ended: %s; retrying in %.1fs", exc, backoff)
                await self._close_nc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_S)

    def _tls(self) -> ssl.SSLContext | None:
        c = self.config
        if not (c.snake_url.startswith("tls://") or c.root_ca_file or c.tls_cert_file):
            return None
        ctx = ssl.create_default_context(cafile=c.root_ca_file or None)
        if c.tls_cert_file:
            ctx.load_cert_chain(c.tls_cert_file, c.tls_key_file or None)
        return ctx

    async def _connect(self, user: str, password: str, inbox: str, reconnect: bool):
        import nats

        errors: list[Exception] = []

        async def on_error(exc):
            errors.append(exc)
            text = str(exc).lower()
            if "authorization" in text or "authentication" in text:
                if not self._auth_failures:
                    self._auth_failing_since = time.monotonic()
                self._auth_failures += 1
            log.debug("snake: %s", exc)

        try:
            nc = await nats.connect(
                self.config.snake_url,
                user=user,
                password=password,
                inbox_prefix=inbox,
                name=f"fluxrig-rack-{self.config.name or socket.gethostname()}",
                tls=self._tls(),
                connect_timeout=max(1, int(self.config.connect_timeout)),
                allow_reconnect=reconnect,
                # Bounded: after a few failed attempts the client closes and _run() reconnects
                # with its own backoff, counting refused credentials on the way.
                max_reconnect_attempts=SESSION_RECONNECT_ATTEMPTS if reconnect else 0,
                reconnect_time_wait=self.config.reconnect_wait,
                error_cb=on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except Exception as exc:
            detail = "; ".join(str(e) for e in errors[-2:]) or str(exc)
            raise FluxError(f"cannot connect to {self.config.snake_url} as {user}: {detail}") from None
        return nc

    async def _on_disconnected(self):
        self.connected.clear()

    async def _on_reconnected(self):
        self.connected.set()
        self._beat_now.set()

    async def _close_nc(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        self.connected.clear()
        if nc is not None:
            await close_quietly(nc, CLOSE_TIMEOUT_S)

    # -- enrollment ----------------------------------------------------------------------------

    async def _enroll(self) -> None:
        c = self.config
        if not c.bootstrap_token:
            raise EnrollmentDenied("snake.bootstrap_token is empty; copy it from the Mixer's state_dir/bootstrap-token")
        sk, pk = P.new_reply_keypair()
        name = S.sanitize_rack_name(c.name or socket.gethostname())
        hello = P.encode_hello(c.bootstrap_token, name, pk, _version.__version__, socket.gethostname(), c.labels)
        nc = await self._connect(S.ENROLL_USER, S.ENROLL_PASSWORD, S.ENROLL_INBOX, reconnect=False)
        try:
            deadline = time.monotonic() + c.enrollment_timeout
            while not self._stopping:
                try:
                    msg = await nc.request(S.HELLO, hello, timeout=c.enrollment_interval)
                except Exception as exc:  # no responders / timeout: the Mixer is not there yet
                    if time.monotonic() > deadline:
                        raise FluxError(f"no answer to Hello within {c.enrollment_timeout:.0f}s: {exc}") from None
                    await asyncio.sleep(min(c.enrollment_interval, 0.5))
                    continue
                reply = P.decode_hello_reply(msg.data)
                if reply["status"] == "denied":
                    raise EnrollmentDenied(reply["message"] or "no reason given")
                data = P.unseal(sk, reply["sealed"])
                passport = self.store.accept(data)
                if reply["heartbeat_interval"]:
                    self._heartbeat_interval = reply["heartbeat_interval"]
                self.passport = passport
                self._auth_failures = 0
                log.info("enrolled as rack %s (%s): %s", passport.rack_name, passport.rack_id, reply["message"])
                await self._status_changed(passport)
                await self._maybe_apply(passport)
                return
        finally:
            await close_quietly(nc, CLOSE_TIMEOUT_S)

    # -- session -------------------------------------------------------------------------------

    async def _session(self, passport: Passport) -> None:
        try:
            nc = await self._connect(passport.bus_user, passport.bus_password, S.inbox_prefix(passport.rack_name), True)
        except FluxError:
            if self._credentials_revoked():
                log.error("the Snake refused this rack's credentials %d times: enrolling again", self._auth_failures)
                self._forget()
                return
            raise
        self._auth_failures = 0
        self.nc = nc
        self.js = nc.jetstream()
        self.connected.set()
        self._session_end.clear()
        name = passport.rack_name
        sub = await nc.subscribe(f"flux.ctrl.{name}.>", cb=self._on_ctrl)
        log.info("connected to the Snake as rack %s", name)
        try:
            await self._heartbeat_loop(name)
        finally:
            log.debug("leaving the bus session as rack %s", name)
            try:
                # Bounded: on a dropped connection nats-py may wait for a reconnect first.
                await asyncio.wait_for(sub.unsubscribe(), 1.0)
            except (Exception, asyncio.TimeoutError):
                pass
            await self._close_nc()

    async def _heartbeat_loop(self, name: str) -> None:
        while not self._stopping and not self._session_end.is_set():
            if self.passport is None or self.passport.rack_name != name:
                return
            if self.connected.is_set():
                try:
                    await self._beat(name)
                except Exception as exc:  # Mixer away: keep running, try next interval
                    log.debug("heartbeat failed: %s", exc)
            if self.nc is not None and self.nc.is_closed:
                raise FluxError("bus connection closed")
            if self._credentials_revoked():
                log.error("credentials refused after reconnecting: enrolling again")
                self._forget()
                return
            self._beat_now.clear()
            waiter = asyncio.ensure_future(self._beat_now.wait())
            ender = asyncio.ensure_future(self._session_end.wait())
            try:
                await asyncio.wait({waiter, ender}, timeout=max(MIN_HEARTBEAT_S, self._heartbeat_interval),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                ender.cancel()

    async def _beat(self, name: str) -> None:
        stats = {}
        if self._stats is not None:
            try:
                stats = dict(self._stats() or {})
            except Exception as exc:
                stats = {"stats_error": str(exc)}
        hb = P.encode_heartbeat(
            self.passport.serial if self.passport else 0,
            self.applied_version,
            self.apply_state,
            self.apply_reason,
            time.monotonic() - self.started,
            stats,
        )
        timeout = min(REQUEST_TIMEOUT_MAX_S, max(0.5, self._heartbeat_interval))
        msg = await self.nc.request(S.heartbeat(name), hb, timeout=timeout)
        reply = P.decode_heartbeat_reply(msg.data)
        if reply["heartbeat_interval"]:
            self._heartbeat_interval = reply["heartbeat_interval"]
        if reply["passport"]:
            await self._receive_passport(reply["passport"], "heartbeat")

    async def _on_ctrl(self, msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        if verb in S.CTRL_COMMANDS:  # signed commands: never decoded as a plain ctrl map
            if self._on_command is None:
                log.warning("control command %s ignored: this Rack has no kill switch handler", verb)
                return
            await _call_safely("on_command", self._on_command, verb, msg.data)
            self._beat_now.set()
            return
        try:
            body = P.decode_ctrl(msg.data)
        except P.AgentProtocolError as exc:
            log.warning("bad control message on %s: %s", msg.subject, exc)
            return
        if verb in (S.CTRL_RELOAD, S.CTRL_PASSPORT) and body["passport"]:
            await self._receive_passport(body["passport"], verb)
        elif verb == S.CTRL_SHUTDOWN:
            log.warning("shutdown requested by the Mixer: %s", body["reason"])
            if self._on_shutdown is not None:
                await _call_safely("on_shutdown", self._on_shutdown, body["reason"])
        elif verb == S.CTRL_LOG_LEVEL and body["level"]:
            log.info("log level set to %s by the Mixer", body["level"])
            if self._on_log_level is not None:
                await _call_safely("on_log_level", self._on_log_level, body["level"])
            else:
                logging.getLogger("fluxrig").setLevel(LOG_LEVELS.get(body["level"], logging.INFO))

    # -- passports and scenarios -------------------------------------------------------------------

    async def _receive_passport(self, data: bytes, via: str) -> None:
        try:
            new = self.store.verify(data)
        except PassportError as exc:
            log.error("passport received via %s refused: %s", via, exc)
            return
        old = self.passport
        if old is not None and (new.rack_id != old.rack_id or new.serial <= old.serial):
            log.debug("passport via %s ignored (serial %d, have %d)", via, new.serial, old.serial)
            return
        self.passport = self.store.accept(data)
        log.info("passport %d via %s: status %s, scenario %s", new.serial, via, new.status, new.scenario_version or "none")
        if old is None or old.status != new.status:
            await self._status_changed(new)
        if new.status == "removed":
            self._forget()
            return
        if old is not None and (old.rack_name != new.rack_name or old.bus_user != new.bus_user):
            self._session_end.set()  # reconnect under the new identity
        await self._maybe_apply(new)

    async def _status_changed(self, passport: Passport) -> None:
        if self._on_status is not None:
            try:
                await _maybe_await(self._on_status(passport.status))
            except Exception as exc:
                log.error("on_status callback failed: %s", exc)

    def _credentials_revoked(self) -> bool:
        """Refused often enough and for long enough: not a Snake still reloading its users, but
        a Mixer that no longer knows this Rack."""
        return (self._auth_failures >= AUTH_FAILURES_BEFORE_REENROLL
                and time.monotonic() - self._auth_failing_since >= AUTH_REVOKED_AFTER_S)

    def _forget(self) -> None:
        log.warning("rack %s removed or unknown to the Mixer: passport wiped, enrolling again",
                    self.passport.rack_name if self.passport else "?")
        self.store.wipe(keep_pin=True)
        self.passport = None
        self._auth_failures = 0
        self._session_end.set()

    async def reapply(self) -> None:
        """Apply the current passport's scenario again, even if its version already ran (the
        runtime was emptied by a kill switch and is now revived)."""
        if self.passport is not None:
            self.apply_state = "none"
            await self._maybe_apply(self.passport)

    async def _maybe_apply(self, passport: Passport) -> None:
        if passport.status not in ("active", "offline") or passport.scenario is None:
            return
        if passport.scenario_version == self.applied_version and self.apply_state == "applied":
            return
        async with self._apply_lock:
            self.apply_state, self.apply_reason = "applying", ""
            try:
                await _maybe_await(self._apply_cb(passport.scenario, passport.scenario_version))
            except Exception as exc:
                self.apply_state, self.apply_reason = "rejected", f"{type(exc).__name__}: {exc}"[:2000]
                log.error("scenario %s rejected: %s", passport.scenario_version, exc)
            else:
                self.apply_state, self.apply_reason = "applied", ""
                log.info("scenario %s applied", passport.scenario_version)
            self.applied_version = passport.scenario_version
        self._beat_now.set()


async def close_quietly(nc, timeout: float) -> bool:
    """Close a nats-py connection without ever hanging: nats-py's close() can stay blocked
    behind a reconnect loop (e.g. credentials just revoked) and does not always honour
    cancellation, so asyncio.wait_for would wait for it forever. The close keeps running in
    the background if it overruns. True when it finished in time."""
    task = asyncio.ensure_future(nc.close())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.debug("bus connection close still pending after %.1fs; left to finish in the background", timeout)
        return False
    if not task.cancelled() and task.exception() is not None:
        log.debug("bus connection close failed: %s", task.exception())
    return True


async def _call_safely(name: str, fn, *args) -> None:
    """Run a runtime callback; its failure is logged, never allowed to kill the subscription."""
    try:
        await _maybe_await(fn(*args))
    except Exception as exc:
        log.error("%s callback failed: %s", name, exc)


async def _maybe_await(value):
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value
