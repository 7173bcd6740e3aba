"""RackAgent: the Rack's session with the Snake (enrollment, passport, heartbeats, control).

The agent owns the NATS connection and implements `SnakeSession` (session.py) for the guaranteed
lane and the WAL pump. It never calls into the Rack: whatever it needs the Rack to do, it posts
as a typed request (fluxrig/rack_requests.py) on the Rack's RequestQueue and, where it must
report the outcome, awaits the request's future (bounded):

    ApplyScenario   a verified passport carries a scenario version not yet applied; the outcome
                    becomes the apply report (applied, or rejected with the reason) on the next
                    heartbeat, sent at once
    ControlCommand  a signed verb (CommandVerb: kill switch, shutdown, log-level) with the raw
                    signed command and the pins and rack id to verify it against, or the kill
                    state a heartbeat reply carried (verb ""); a heartbeat follows at once

Time. Each heartbeat carries a challenge; the reply's signed time stamp feeds `mixer_clock`
(fluxrig/timesync.py), which the Rack's kill switch judges command freshness by.

Sovereign continuity. `start()` loads the stored passport (`<state_dir>/rack.flux`) and, if it
verifies against the pinned key and carries a scenario, posts it at once, before any network:
the hot path never waits on the Mixer or the Snake. Connection loss only pauses heartbeats; the
running scenario stays.

Lifecycle.
0. Identity: at first start the Rack generates its NKey (`<state_dir>/identity.nkey`, 0600); it
   is its only bus credential (wire/identity.py). Trust comes from the enrollment bundle
   (wire/bundle.py: Snake URLs, CA, Mixer key, token): TLS is verified against the bundle's CA
   (a wrong CA fails closed, saying so), a plain-text URL is refused unless
   `snake.insecure_plaintext`, and enrolling without a pinned Mixer key is refused unless
   `snake.trust_on_first_use` (both logged).
1. No passport: connect without credentials (the Snake maps that to the enroll identity), send
   Hello with the token, the NKey public key, a proof of possession and a one-use X25519 key,
   retry every `enrollment_interval`; `denied` is logged and retried after
   `enrollment_timeout` (the token may be fixed meanwhile); `removed` writes `<state_dir>/removed`
   and the Rack stops enrolling for good (it stays out until an operator deletes the identity
   and the marker). The reply's passport is unsealed, verified against the pins and stored.
2. With a passport: connect as the Rack's own NKey (its inbox prefix `_INBOX_<rack>`),
   subscribe `flux.ctrl.<rack>.>`, heartbeat every interval. A heartbeat reply or a control
   message may carry a newer passport: older or equal serials are ignored (no replay), a
   changed name or bus user restarts the session, status `removed` wipes the passport and
   marks the Rack removed (no re-enrollment), a new scenario version is applied and reported on the next heartbeat.
2b. Renamed while away (issue 13): the Snake accepts the NKey but refuses the former name's
   heartbeat and ctrl subjects (permissions violation): the session ends and the Rack says
   Hello with its own identity (no token needed); the reply's passport carries the new name,
   and the next session runs under it (no restart). Still the same name (the Snake has not
   applied its new users yet): it waits `reconnect_wait` and connects again.
3. Credentials refused `AUTH_FAILURES_BEFORE_REENROLL` times over at least
   `AUTH_REVOKED_AFTER_S` while the server is reachable: the Mixer no longer knows this Rack,
   so wipe and enroll again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .. import _version
from ..aiotools import cancel_and_wait, close_quietly
from ..ctrl import RefusalLog
from ..errors import EnrollmentDenied, FluxError, PassportError
from ..fileutil import write_private_atomic
from ..passport import Passport, PassportStore, parse_public_key
from ..rack_requests import ApplyScenario, ControlCommand, RequestQueue
from ..scenario.groups import projection_groups, without_groups
from ..timesync import MixerClock, relax_tls_time_check
from ..wire import identity as I
from ..wire import messages as W
from ..wire import subjects as S
from ..wire.bundle import read_bundle
from ..wire.vocab import TRAFFIC_STATUSES, ApplyState, CommandVerb, CtrlVerb, HelloStatus, RackStatus
from .session import PullSubscription, SessionState, SessionUnavailable

__all__ = [
    "AgentConfig",
    "RackAgent",
    "StatsSource",
    "AUTH_FAILURES_BEFORE_REENROLL",
    "IDENTITY_FILE",
    "REMOVED_FILE",
    "RackRemoved",
]

log = logging.getLogger("fluxrig.agent")

AUTH_FAILURES_BEFORE_REENROLL = 5
# ...spread over at least this long: a just-enrolled Rack may dial before the Snake's reload.
AUTH_REVOKED_AFTER_S = 5.0
SESSION_RECONNECT_ATTEMPTS = 5
CLOSE_TIMEOUT_S = 2.0
RECONNECT_BACKOFF_MAX_S = 10.0
MIN_HEARTBEAT_S = 0.05
REQUEST_TIMEOUT_MAX_S = 5.0
# How long the agent waits for the Rack to handle a control command before it heartbeats anyway.
COMMAND_OUTCOME_WAIT_S = 30.0
#: Appended to the version a suspended member runs once it left its groups (issue 17).
LEFT_GROUPS_SUFFIX = "+left-groups"

_COMMAND_VERBS = frozenset(CommandVerb)
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not named by the ssl module); see RackAgent._tls.
X509_V_FLAG_NO_CHECK_TIME = 0x200000
_CTRL_VERBS = frozenset(CtrlVerb)
# The Rack's bus identity (an NKey seed, 0600) and the marker of a removal, in its state dir.
IDENTITY_FILE = "identity.nkey"
REMOVED_FILE = "removed"


class RackRemoved(EnrollmentDenied):
    """The Mixer removed this Rack's identity: it stays out, and does not enroll again by itself."""


#: What the heartbeat carries as `stats`: a function returning a JSON-able map (never the Rack).
StatsSource = Callable[[], Mapping]


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
    # The enrollment bundle (a path or the string, wire/bundle.py): fills in what is not given
    # explicitly (URLs, CA, pinned keys, token). Resolved once, in __post_init__.
    enrollment_bundle: str = field(default="", repr=False)
    trust_on_first_use: bool = False
    insecure_plaintext: bool = False
    root_ca_pem: str = field(default="", repr=False)

    def __post_init__(self):
        if self.enrollment_bundle:
            b = read_bundle(self.enrollment_bundle)
            self.snake_url = self.snake_url or ",".join(b.urls)
            self.bootstrap_token = self.bootstrap_token or b.token
            for key in b.mixer_key_bytes:
                if key not in self.mixer_public_keys:
                    self.mixer_public_keys = [*self.mixer_public_keys, key]
            if not self.root_ca_file and not self.root_ca_pem:
                self.root_ca_pem = b.ca_pem

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.snake_url.split(",") if u.strip()]

    @classmethod
    def from_config(cls, cfg, labels: dict | None = None) -> AgentConfig:
        """From a loaded `fluxrig.config.Config` (sections base, rack, snake)."""
        keys = [parse_public_key(k) for k in (cfg.snake.mixer_public_key, cfg.snake.mixer_public_key_next) if k]
        return cls(
            enrollment_bundle=cfg.snake.enrollment_bundle,
            trust_on_first_use=cfg.snake.trust_on_first_use,
            insecure_plaintext=cfg.snake.insecure_plaintext,
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


def _names_own_subject(error_text: str, rack: str) -> bool:
    """A permissions-violation text (lower-cased by nats-py) names this Rack's heartbeat or
    ctrl subject."""
    try:
        own = (S.heartbeat(rack), S.ctrl_of(rack))
    except ValueError:
        return False
    return any(f'"{subject}"' in error_text or f" {subject}" in error_text for subject in own)


class _SessionEnd(Exception):
    """Internal: leave the current bus session (identity changed, removed, stopping)."""


class RackAgent:
    """The Rack's Snake session (see the module docstring). Implements SnakeSession."""

    def __init__(self, config: AgentConfig, requests: RequestQueue, *, stats: StatsSource | None = None):
        if not config.snake_url:
            raise FluxError("snake.url is empty: a standalone Rack has no agent")
        self.config = config
        if config.insecure_plaintext:
            log.warning("snake.insecure_plaintext = true: nats:// URLs allowed; the token, passports and "
                        "payloads may cross the network readable")  # fmt: skip
        if config.trust_on_first_use and not config.mixer_public_keys:
            log.warning("snake.trust_on_first_use = true: this Rack will trust whichever Mixer answers first")
        self._requests = requests
        self._stats = stats
        self.store = PassportStore(config.state_dir, config.state_file, list(config.mixer_public_keys))
        self.passport: Passport | None = None
        self.applied_version = ""
        self.apply_state = ApplyState.NONE
        self.apply_reason = ""
        self._nc = None
        self._js = None
        self._relays: dict[str, Callable] = {}  # group relay subject -> callback (issue 17)
        self._relay_subs: dict[str, object] = {}  # ... -> its subscription in this session
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
        self._name_refused = False  # the Snake refused this session's own subjects (renamed?)
        self.name_recoveries = 0  # Hellos sent for that reason
        self._apply_lock = asyncio.Lock()
        self._first_apply: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()
        self.connected = asyncio.Event()
        self._usable = asyncio.Event()
        self._generation = 0
        self.mixer_clock = MixerClock()  # the Mixer's time, from signed heartbeat replies
        self.refusals = RefusalLog(log, "passport")  # refused reload/passport pushes, counted
        self.identity_path = os.path.join(config.state_dir, IDENTITY_FILE)
        self.removed_path = os.path.join(config.state_dir, REMOVED_FILE)
        self._seed: str | None = None
        self.removed = ""  # why, once the Mixer removed this Rack

    # -- identity --------------------------------------------------------------------------

    def _identity(self) -> str:
        """This Rack's NKey seed: read from the state dir, generated there (0600) at first start."""
        if self._seed is None:
            try:
                with open(self.identity_path, encoding="ascii") as fh:
                    self._seed = fh.read().strip()
                I.public_key(self._seed)
            except FileNotFoundError:
                os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
                self._seed = I.new_user_seed()
                write_private_atomic(self.identity_path, (self._seed + "\n").encode())
                log.info("bus identity generated: %s (%s)", I.public_key(self._seed), self.identity_path)
            except (OSError, I.IdentityError) as exc:
                raise FluxError(f"cannot use the bus identity {self.identity_path}: {exc}") from None
        return self._seed

    @property
    def nkey(self) -> str:
        """This Rack's public bus identity (U...)."""
        return I.public_key(self._identity())

    def _mark_removed(self, reason: str) -> None:
        self.removed = reason or "removed by the Mixer"
        try:
            write_private_atomic(self.removed_path, (self.removed + "\n").encode())
        except OSError as exc:
            log.error("cannot write %s: %s", self.removed_path, exc)
        log.error(
            "this Rack was removed by the Mixer (%s): it stays out and will not enroll again. To join again, "
            "delete %s and %s and give it a new enrollment bundle",
            self.removed,
            self.identity_path,
            self.removed_path,
        )

    # -- SnakeSession ----------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        if not self.connected.is_set() or self._js is None:
            return SessionState.DOWN
        if self.passport is None or self.passport.status not in TRAFFIC_STATUSES:
            return SessionState.WAITING
        return SessionState.USABLE

    @property
    def rack_name(self) -> str | None:
        return self.passport.rack_name if self.passport else None

    @property
    def generation(self) -> int:
        return self._generation

    async def wait_usable(self, timeout: float | None = None) -> bool:
        if self._usable.is_set():
            return True
        try:
            await asyncio.wait_for(self._usable.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None,
                      timeout: float = 5.0):  # fmt: skip
        state = self.state
        if state is not SessionState.USABLE:
            raise SessionUnavailable(state)
        return await self._js.publish(subject, payload, timeout=timeout, headers=headers or None)

    def jetstream(self):
        """The JetStream context while the session is usable, else None: for a group's saga
        mirror (fluxrig.saga.mirror.JsSafBus, issue 17 item 4), which makes its own few calls
        on its group's stream (its bus user may make no others)."""
        return self._js if self.state is SessionState.USABLE else None

    # -- group relay (issue 17 item 3): core NATS, no JetStream, between members of a group ------

    async def relay_publish(self, subject: str, payload: bytes) -> bool:
        """Publish on a group relay subject (core NATS: at most once, nothing stored); False
        when the session is not usable (the caller counts it)."""
        nc = self._nc
        if self.state is not SessionState.USABLE or nc is None:
            return False
        await nc.publish(subject, payload)
        return True

    def relay_subscribe(self, subject: str, cb) -> None:
        """Deliver every message on `subject` to `cb(msg)` (async) in this and every later
        session (re-subscribed after a reconnect under a new session); `relay_unsubscribe`
        stops it."""
        self._relays[subject] = cb
        nc = self._nc
        if nc is not None and subject not in self._relay_subs:
            self._spawn(self._relay_sub(nc, subject, cb))

    def relay_unsubscribe(self, subject: str) -> None:
        self._relays.pop(subject, None)
        sub = self._relay_subs.pop(subject, None)
        if sub is not None:
            self._spawn(sub.unsubscribe())

    async def _relay_sub(self, nc, subject: str, cb) -> None:
        try:
            self._relay_subs[subject] = await nc.subscribe(subject, cb=cb)
        except Exception as exc:  # the session went: the next one subscribes again
            log.warning("group relay: cannot subscribe to %s: %s", subject, exc)

    async def pull_subscribe(self, consumer: str, stream: str) -> PullSubscription:
        if self._js is None:
            raise SessionUnavailable(SessionState.DOWN, f"bind consumer {consumer}")
        return await self._js.pull_subscribe_bind(consumer=consumer, stream=stream)

    async def flush(self, timeout: float = 1.0) -> None:
        nc = self._nc
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.flush(), timeout)
            except Exception:  # nothing to do about it: unacked messages are redelivered
                pass

    def _refresh_state(self) -> None:
        if self.state is SessionState.USABLE:
            self._usable.set()
        else:
            self._usable.clear()

    # -- public ----------------------------------------------------------------------------

    @property
    def status(self) -> RackStatus:
        return RackStatus(self.passport.status) if self.passport else RackStatus.UNENROLLED

    @property
    def rack_id(self) -> str | None:
        return self.passport.rack_id if self.passport else None

    async def start(self) -> None:
        """Load the stored passport and post its scenario at once (offline-capable: before any
        network), then run the session in the background."""
        self._stopping = False
        self._identity()  # generated at first start, before anything dials
        try:
            with open(self.removed_path, encoding="utf-8") as fh:
                self.removed = fh.read().strip() or "removed by the Mixer"
            log.error("this Rack was removed by the Mixer (%s); not enrolling. Delete %s and %s to join again",
                      self.removed, self.identity_path, self.removed_path)  # fmt: skip
        except FileNotFoundError:
            pass
        try:
            self.passport = self.store.load()
        except PassportError as exc:
            log.error("stored passport refused, enrolling again: %s", exc)
            self.passport = None
        loop = asyncio.get_running_loop()
        if self.passport is not None:
            log.info("passport: rack %s (%s), status %s, scenario %s",
                     self.passport.rack_name, self.passport.rack_id, self.passport.status,
                     self.passport.scenario_version or "none")  # fmt: skip
            request = self._apply_request(self.passport, force=False)
            if request is not None:
                # Posted now, so the Rack finds it before it says READY; the outcome is awaited
                # in the background.
                self._requests.post_nowait(request)
                self._first_apply = loop.create_task(self._await_apply(request), name="rack-agent-apply")
        self._task = loop.create_task(self._run(), name="rack-agent")

    async def stop(self) -> None:
        self._stopping = True
        self._session_end.set()
        await cancel_and_wait(self._first_apply)
        for task in list(self._bg):
            await cancel_and_wait(task)
        await cancel_and_wait(self._task)
        self._task = None
        await self._close_nc()

    def reapply(self) -> bool:
        """Post the current passport's scenario again, even if its version already ran (the
        runtime was emptied by the kill switch and is now revived). False when the passport
        carries no scenario to run."""
        if self.passport is None or self.passport.scenario is None:
            return False
        self.apply_state = ApplyState.NONE
        self._spawn(self._maybe_apply(self.passport))
        return True

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
            if self.removed:
                return  # stays out: no session, no Hello, until an operator gives it a new identity
            try:
                if self.passport is None:
                    log.debug("enrolling with the bootstrap token")
                    await self._enroll()
                    backoff = self.config.reconnect_wait
                    continue
                await self._session(self.passport)
                backoff = self.config.reconnect_wait
                if self._name_refused:
                    await self._recover_name()
            except asyncio.CancelledError:
                raise
            except RackRemoved as exc:
                self.denials += 1
                self.last_error = str(exc)
                self._mark_removed(exc.reason)
            except EnrollmentDenied as exc:
                self.denials += 1
                self.last_error = str(exc)
                log.error("%s; retrying in %.0fs (check snake.enrollment_bundle)", exc, self.config.enrollment_timeout)
                await asyncio.sleep(self.config.enrollment_timeout)
            except Exception as exc:
                self.last_error = str(exc)
                log.warning("snake session ended: %s; retrying in %.1fs", exc, backoff)
                await self._close_nc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_S)

    def _tls(self) -> ssl.SSLContext | None:
        """The TLS context: trusts the bundle's CA (or snake.root_ca_file, else the system's),
        checks the host name, presents the client certificate under mTLS. None only for an
        opted-in plain-text URL."""
        c = self.config
        plain = [u for u in c.urls if not u.startswith("tls://")]
        if plain:
            if not c.insecure_plaintext:
                raise FluxError(
                    f"refusing the plain-text Snake URL {plain[0]!r}: use tls:// (the enrollment bundle has the "
                    "URLs), or set snake.insecure_plaintext = true to allow it (insecure)"
                )
            if not (c.root_ca_file or c.root_ca_pem or c.tls_cert_file):
                return None
        try:
            ctx = ssl.create_default_context(cafile=c.root_ca_file or None, cadata=c.root_ca_pem or None)
            if c.root_ca_file or c.root_ca_pem:
                # The Rack's clock is not trusted (a gateway without RTC boots at 1970; one can be
                # minutes off): against the cluster's own pinned CA the chain and host name are
                # checked, the validity dates are not (OpenSSL X509_V_FLAG_NO_CHECK_TIME), else a
                # Rack could never reach the Mixer that gives it the time. The hub renews its
                # certificates; the system store (public CAs) keeps its date checks.
                ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
            if c.tls_cert_file:
                ctx.load_cert_chain(c.tls_cert_file, c.tls_key_file or None)
            relax_tls_time_check(ctx)  # a clock at 1970 cannot judge certificate dates (timesync.py)
        except (OSError, ssl.SSLError) as exc:
            raise FluxError(f"TLS set-up failed (snake.root_ca_file / tls_cert_file / bundle CA): {exc}") from None
        return ctx

    def _trust_source(self) -> str:
        c = self.config
        if c.root_ca_file:
            return f"snake.root_ca_file {c.root_ca_file}"
        return "the enrollment bundle's CA" if c.root_ca_pem else "the system CA store"

    async def _connect(self, seed: str | None, inbox: str, reconnect: bool, user: str):
        """A nats-py client: as this Rack's NKey identity (`seed`), or with no credentials
        (enrollment: the Snake maps it to the enroll identity). `user` names it in messages."""
        import nats

        errors: list[Exception] = []

        async def on_error(exc):
            errors.append(exc)
            text = str(exc).lower()
            if "authorization" in text or "authentication" in text:
                if not self._auth_failures:
                    self._auth_failing_since = time.monotonic()
                self._auth_failures += 1
            elif seed is not None and "permissions violation" in text and _names_own_subject(text, user):
                # Our own heartbeat or ctrl subject refused: the Mixer renamed this Rack (or
                # the Snake still runs the users from before it told us the new name).
                if not self._name_refused:
                    log.warning("the Snake refuses rack %s its own subjects (%s): asking the Mixer for "
                                "this rack's passport", user, exc)  # fmt: skip
                self._name_refused = True
                self._session_end.set()
            log.debug("snake: %s", exc)

        tls = self._tls()
        try:
            nc = await nats.connect(
                self.config.urls,
                nkeys_seed_str=seed,
                inbox_prefix=inbox,
                name=f"fluxrig-rack-{self.config.name or socket.gethostname()}",
                tls=tls,
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
            bad_cert = [e for e in [*errors, exc] if isinstance(e, ssl.SSLCertVerificationError)]
            if bad_cert:
                # Fail closed, and say so plainly: this is not a Snake that is down.
                raise FluxError(
                    f"TLS: the Snake at {self.config.snake_url} presented a certificate that does not verify "
                    f"against {self._trust_source()} ({bad_cert[-1].verify_message or bad_cert[-1]}); "
                    "not connecting. Use the enrollment bundle of this Mixer"
                ) from None
            detail = "; ".join(str(e) for e in errors[-2:]) or str(exc)
            raise FluxError(f"cannot connect to {self.config.snake_url} as {user}: {detail}") from None
        return nc

    async def _on_disconnected(self):
        self.connected.clear()
        self._refresh_state()

    async def _on_reconnected(self):
        self._generation += 1
        self.connected.set()
        self._refresh_state()
        self._beat_now.set()

    async def _close_nc(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._relay_subs.clear()  # closed with the connection
        self.connected.clear()
        self._refresh_state()
        if nc is not None:
            await close_quietly(nc, CLOSE_TIMEOUT_S)

    # -- enrollment ----------------------------------------------------------------------------

    def _hello(self, token: str) -> tuple[bytes, bytes]:
        """(one-use reply secret key, encoded Hello) proving this Rack's NKey."""
        c = self.config
        sk, pk = W.new_reply_keypair()
        name = S.sanitize_rack_name(c.name or socket.gethostname())
        seed = self._identity()
        return sk, W.Hello(token, name, pk, _version.__version__, socket.gethostname(), c.labels,
                           nkey=I.public_key(seed), nkey_sig=I.prove(seed, pk)).encode()  # fmt: skip

    async def _recover_name(self) -> None:
        """The Snake refused this session's own subjects (see 2b in the module docstring): a
        Hello with this Rack's identity brings its current passport (the Mixer answers a known
        identity without a token). A passport with another name starts the next session under
        it; otherwise wait `reconnect_wait` (the Snake reloading its users). RackRemoved when
        the Mixer says removed; any other failure is logged and the session is tried again."""
        self._name_refused = False
        self.name_recoveries += 1
        name = self.rack_name
        sk, hello = self._hello(self.config.bootstrap_token)
        try:
            nc = await self._connect(None, S.ENROLL_INBOX, reconnect=False, user=S.ENROLL_USER)
        except FluxError as exc:
            log.warning("cannot ask for this rack's passport: %s", exc)
            nc = None
        if nc is not None:
            try:
                msg = await nc.request(S.HELLO, hello, timeout=max(1.0, self.config.enrollment_interval))
                reply = W.HelloReply.decode(msg.data)
                if reply.status is HelloStatus.REMOVED:
                    raise RackRemoved(reply.message or "removed")
                if reply.status is HelloStatus.DENIED:
                    log.warning("the Mixer did not give this rack its passport: %s", reply.message)
                else:
                    accepted = self._accept_passport(W.unseal(sk, reply.sealed), "hello")
                    if accepted is not None:
                        # In the background: applying may wait for the lanes, which need the
                        # session this loop is about to open.
                        self._spawn(self._follow_passport(*accepted))
            except RackRemoved:
                raise
            except Exception as exc:  # no answer, a bad reply: the next session tries again
                log.warning("no passport from the Mixer after the Snake refused rack %s: %s", name, exc)
            finally:
                await close_quietly(nc, CLOSE_TIMEOUT_S)
        if self.rack_name == name and not self._stopping:
            await asyncio.sleep(self.config.reconnect_wait)
        else:
            log.info("rack %s is now rack %s (renamed at the Mixer)", name, self.rack_name)

    async def _enroll(self) -> None:
        c = self.config
        if not c.bootstrap_token:
            raise EnrollmentDenied(
                "no enrollment token: set snake.enrollment_bundle (from `fluxrig-mixer tokens create`)"
            )
        if not c.mixer_public_keys and not c.trust_on_first_use and not self.store.pins():
            raise EnrollmentDenied(
                "no pinned Mixer key: refusing to trust whichever Mixer answers first. Set snake.enrollment_bundle "
                "(it carries the key) or snake.mixer_public_key; snake.trust_on_first_use = true allows it (insecure)"
            )
        sk, hello = self._hello(c.bootstrap_token)
        nc = await self._connect(None, S.ENROLL_INBOX, reconnect=False, user=S.ENROLL_USER)
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
                reply = W.HelloReply.decode(msg.data)
                if reply.status is HelloStatus.REMOVED:
                    raise RackRemoved(reply.message or "removed")
                if reply.status is HelloStatus.DENIED:
                    raise EnrollmentDenied(reply.message or "no reason given")
                passport = self.store.accept(W.unseal(sk, reply.sealed))
                if reply.heartbeat_interval:
                    self._heartbeat_interval = reply.heartbeat_interval
                self.passport = passport
                self._auth_failures = 0
                log.info("enrolled as rack %s (%s): %s", passport.rack_name, passport.rack_id, reply.message)
                await self._maybe_apply(passport)
                return
        finally:
            await close_quietly(nc, CLOSE_TIMEOUT_S)

    # -- session -------------------------------------------------------------------------------

    async def _session(self, passport: Passport) -> None:
        seed = self._identity()
        if passport.bus_user != I.public_key(seed):
            # A passport from before NKey identities, or for another key: it cannot connect.
            log.warning("the passport names bus identity %s, not this Rack's %s: enrolling again",
                        passport.bus_user[:12], I.public_key(seed)[:12])  # fmt: skip
            self._forget()
            return
        try:
            nc = await self._connect(seed, S.inbox_prefix(passport.rack_name), True, user=passport.rack_name)
        except FluxError:
            if self._credentials_revoked():
                log.error("the Snake refused this rack's credentials %d times: enrolling again", self._auth_failures)
                self._forget()
                return
            raise
        self._auth_failures = 0
        self._nc = nc
        self._js = nc.jetstream()
        self._generation += 1
        self.connected.set()
        self._refresh_state()
        self._session_end.clear()
        name = passport.rack_name
        sub = await nc.subscribe(S.ctrl_of(name), cb=self._on_ctrl)
        for subject, cb in list(self._relays.items()):  # group relays (issue 17) in every session
            await self._relay_sub(nc, subject, cb)
        log.info("connected to the Snake as rack %s", name)
        try:
            await self._heartbeat_loop(name)
        finally:
            log.debug("leaving the bus session as rack %s", name)
            try:
                # Bounded: on a dropped connection nats-py may wait for a reconnect first.
                await asyncio.wait_for(sub.unsubscribe(), 1.0)
            except (TimeoutError, Exception):
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
            if self._nc is not None and self._nc.is_closed:
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
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                waiter.cancel()
                ender.cancel()

    def _heartbeat(self) -> bytes:
        stats: dict = {}
        if self._stats is not None:
            try:
                stats = dict(self._stats() or {})
            except Exception as exc:
                stats = {"stats_error": str(exc)}
        return W.Heartbeat(
            serial=self.passport.serial if self.passport else 0,
            scenario_version=self.applied_version,
            apply=self.apply_state,
            reason=self.apply_reason,
            uptime=time.monotonic() - self.started,
            stats=stats,
            challenge=self.mixer_clock.new_challenge(),
            storage_failed=tuple((stats.get("storage") or {}).get("failed") or ()),  # storage: WAL health flag
        ).encode()

    async def _beat(self, name: str) -> None:
        timeout = min(REQUEST_TIMEOUT_MAX_S, max(0.5, self._heartbeat_interval))
        msg = await self._nc.request(S.heartbeat(name), self._heartbeat(), timeout=timeout)
        reply = W.HeartbeatReply.decode(msg.data)
        self.mixer_clock.observe(reply.time, self.store.pins, self.rack_id)
        if reply.command:  # the desired kill state, verified by the Rack's kill switch
            self._spawn(self._relay_command("", reply.command))
        if reply.heartbeat_interval:
            self._heartbeat_interval = reply.heartbeat_interval
        if reply.passport:
            await self._receive_passport(reply.passport, "heartbeat")

    async def _on_ctrl(self, msg) -> None:
        verb = S.verb_of_subject(msg.subject)
        if verb in _COMMAND_VERBS:  # signed commands: never decoded as a plain ctrl map
            outcome = await self._relay_command(verb, msg.data)
            if verb == CommandVerb.SAF and msg.reply:  # a request: the answer goes to its reply subject
                try:
                    await self._nc.publish(msg.reply, W.SafAnswer.from_outcome(outcome).encode())
                except Exception as exc:  # noqa: BLE001 (the Mixer times out and says so)
                    log.warning("saf answer not sent: %s", exc)
            return
        try:
            body = W.CtrlMessage.decode(msg.data)
        except W.WireError as exc:
            self.refusals.note(verb or msg.subject, "malformed", exc)
            return
        if verb in (CtrlVerb.RELOAD, CtrlVerb.PASSPORT) and body.passport:
            await self._receive_passport(body.passport, verb)
        else:
            self.refusals.note(verb or msg.subject, "unsigned" if verb in _CTRL_VERBS else "verb", "no signed passport")

    async def _relay_command(self, verb: str, data: bytes) -> dict | None:
        """Hand a signed command to the Rack (its KillSwitch verifies it), then heartbeat at once
        so the Mixer learns the outcome; returns the outcome (None: none in time)."""
        try:
            pins = tuple(self.store.pins())
        except Exception as exc:  # an unreadable pin file refuses everything, loudly
            log.error("control command %s refused: cannot read the pinned keys: %s", verb, exc)
            pins = ()
        request = ControlCommand(verb, bytes(data), pins, self.rack_id)
        await self._requests.post(request)
        try:
            await asyncio.wait_for(asyncio.shield(request.outcome), COMMAND_OUTCOME_WAIT_S)
        except TimeoutError:
            log.warning("control command %s: no outcome from the Rack within %.0fs", verb, COMMAND_OUTCOME_WAIT_S)
        except asyncio.CancelledError:
            if not request.outcome.cancelled():  # we are cancelled, not the request
                raise
        except Exception as exc:
            log.error("control command %s failed: %s", verb, exc)
        self._beat_now.set()
        out = request.outcome
        return out.result() if out.done() and not out.cancelled() and out.exception() is None else None

    # -- passports and scenarios -------------------------------------------------------------------

    async def _receive_passport(self, data: bytes, via: str) -> None:
        accepted = self._accept_passport(data, via)
        if accepted is not None:
            await self._follow_passport(*accepted)

    def _accept_passport(self, data: bytes, via: str) -> tuple[Passport | None, Passport] | None:
        """Verify and store a newer passport: (the one it replaces, the new one), or None when
        refused (counted in `refusals`) or not newer."""
        try:
            new = self.store.verify(data)
        except PassportError as exc:
            self.refusals.note(f"passport via {via}", exc.reason, exc)
            return None
        old = self.passport
        if old is not None and (new.rack_id != old.rack_id or new.serial <= old.serial):
            if new.rack_id != old.rack_id or new.serial < old.serial:  # ordered by serial, not time
                self.refusals.note(f"passport via {via}", "stale", f"serial {new.serial}, have {old.serial}")
            return None
        try:
            self.passport = self.store.accept(data)
        except PassportError as exc:
            self.refusals.note(f"passport via {via}", exc.reason, exc)
            return None
        self._refresh_state()
        log.info(
            "passport %d via %s: status %s, scenario %s", new.serial, via, new.status, new.scenario_version or "none"
        )
        return old, new

    async def _follow_passport(self, old: Passport | None, new: Passport) -> None:
        """What an accepted passport changes: removed, a new name (a new session), suspended
        (leave groups), a scenario version to apply (awaited)."""
        if new.status == RackStatus.REMOVED:
            self._forget()
            self._mark_removed(f"passport {new.serial} says removed")
            return
        if old is not None and (old.rack_name != new.rack_name or old.bus_user != new.bus_user):
            self._session_end.set()  # reconnect under the new identity
        if new.status == RackStatus.SUSPENDED and old is not None:
            await self._leave_groups(old)
        await self._maybe_apply(new)

    async def _leave_groups(self, old: Passport) -> None:
        """Suspended: this Rack leaves its groups (issue 17). The group gears of the scenario
        it runs stop, so its share (a shared input, a balancer's connections) moves to the
        other members; its own gears keep running (sovereign continuity). An activated Rack
        gets its full projection back with its next passport (a different version string)."""
        if old.scenario is None or not projection_groups(old.scenario) or self.applied_version != old.scenario_version:
            return
        async with self._apply_lock:
            self.apply_state, self.apply_reason = ApplyState.APPLYING, ""
            request = ApplyScenario(without_groups(old.scenario), f"{old.scenario_version}{LEFT_GROUPS_SUFFIX}",
                                    old.rack_name)  # fmt: skip
            log.warning("suspended: leaving groups %s (their gears stop here; the other members take over)",
                        ", ".join(sorted(projection_groups(old.scenario))))  # fmt: skip
            await self._requests.post(request)
            await self._await_apply(request)

    def _credentials_revoked(self) -> bool:
        """Refused often enough and for long enough: not a Snake still reloading its users, but
        a Mixer that no longer knows this Rack."""
        return (self._auth_failures >= AUTH_FAILURES_BEFORE_REENROLL
                and time.monotonic() - self._auth_failing_since >= AUTH_REVOKED_AFTER_S)  # fmt: skip

    def _forget(self) -> None:
        log.warning("rack %s removed or unknown to the Mixer: passport wiped, enrolling again",
                    self.passport.rack_name if self.passport else "?")  # fmt: skip
        self.store.wipe(keep_pin=True)
        self.passport = None
        self._refresh_state()
        self._auth_failures = 0
        self._session_end.set()

    def _apply_request(self, passport: Passport, force: bool) -> ApplyScenario | None:
        if passport.status not in TRAFFIC_STATUSES or passport.scenario is None:
            return None
        if not force and passport.scenario_version == self.applied_version and self.apply_state == ApplyState.APPLIED:
            return None
        self.apply_state, self.apply_reason = ApplyState.APPLYING, ""
        return ApplyScenario(passport.scenario, passport.scenario_version, passport.rack_name)

    async def _maybe_apply(self, passport: Passport) -> None:
        async with self._apply_lock:
            request = self._apply_request(passport, force=False)
            if request is None:
                return
            await self._requests.post(request)
            await self._await_apply(request)

    async def _await_apply(self, request: ApplyScenario) -> None:
        try:
            await request.outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.apply_state, self.apply_reason = ApplyState.REJECTED, f"{type(exc).__name__}: {exc}"[:2000]
            log.error("scenario %s rejected: %s", request.version, exc)
        else:
            self.apply_state, self.apply_reason = ApplyState.APPLIED, ""
            log.info("scenario %s applied", request.version)
        self.applied_version = request.version
        self._beat_now.set()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._bg.discard)
