"""The control plane's behaviour: enrollment, heartbeats, passports, operator actions, activation.

Job. Everything that turns a registry change into bus traffic lives here, on the event loop:

- Hello (`fluxrig.agent.hello`, request/reply): the bootstrap token is compared in constant
  time; a wrong one gets `denied` and registers nothing. A right one registers the Rack
  (`pending`, or `active` with auto-adopt), adds its bus user to the Snake (reload), signs its
  passport and replies with it sealed to the Hello's one-use X25519 key. A retried Hello with
  the same key gets the same Rack back, never a duplicate.
- Heartbeats (`fluxrig.agent.heartbeat.<rack>`, request/reply): liveness in memory, the
  Rack's apply report stored, `offline` -> `active` when heard again; the reply carries the
  current passport when the Rack's is older (lost push) or half-way to expiry.
- Operator actions (approve, suspend, activate, remove, shutdown, log level): a transition
  through the state machine, the Snake's users regenerated when bus rights change, a fresh
  passport pushed on `flux.ctrl.<rack>.passport`.
- Scenario activation: every projection validated first (nothing changes if one is bad),
  then one passport per Rack carrying its projection, signalled on `flux.ctrl.<rack>.reload`.

Passport bytes last signed per Rack are kept in table `passports` so a restarted Mixer can
answer heartbeats without re-signing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict

from fluxrig.agent import protocol as P
from fluxrig.agent import subjects as S
from fluxrig.errors import FluxError, ScenarioError
from fluxrig.passport import ClusterKey, Passport, sign_passport

from .lanes import LaneConsumers
from .registry import RackRow, Registry
from .scenarios import ScenarioStore, StoredScenario, project
from .snake import BusUser, rack_permissions
from .states import FULL_BUS_STATUSES

__all__ = ["Controller", "LOG_LEVELS"]

log = logging.getLogger("fluxrig.mixer.controller")

LOG_LEVELS = ("trace", "debug", "info", "warning", "error")
# Remember recent Hello reply keys so a retried Hello is answered with the same Rack.
HELLO_CACHE_SIZE = 4096
HELLO_CACHE_TTL_S = 600.0


class Controller:
    def __init__(
        self,
        *,
        registry: Registry,
        scenarios: ScenarioStore,
        key: ClusterKey,
        bootstrap_token: str,
        mixer_name: str,
        auto_adopt: bool = False,
        heartbeat_interval: float = 30.0,
        passport_ttl: float = 30 * 86400.0,
        reload_users=None,
        wait_user=None,
    ):
        self.registry = registry
        self.scenarios = scenarios
        self.key = key
        self.bootstrap_token = bootstrap_token
        self.mixer_name = mixer_name
        self.auto_adopt = auto_adopt
        self.heartbeat_interval = heartbeat_interval
        self.passport_ttl = passport_ttl
        self._reload_users = reload_users  # async callable(list[BusUser])
        self._wait_user = wait_user  # async callable(user, password) -> bool: reload took effect
        self.nc = None
        self._subs = []
        self._hello_cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._passports: dict[str, tuple[int, bytes]] = {}  # rack_id -> last signed (serial, bytes)
        self._sweeper: asyncio.Task | None = None
        self.lanes: LaneConsumers | None = None
        self.counters = {"hello_ok": 0, "hello_denied": 0, "hello_bad": 0, "heartbeats": 0, "heartbeat_unknown": 0}
        self._heard_offline: set[str] = set()  # offline Racks heard again, persisted by the sweeper

    # -- wiring ----------------------------------------------------------------------------------

    async def attach(self, nc) -> None:
        self.nc = nc
        # A queue group lets a second Mixer node share the work (ARCHITECTURE §10).
        self._subs.append(await nc.subscribe(S.HELLO, queue="mixer", cb=self._on_hello))
        self._subs.append(await nc.subscribe(f"{S.HEARTBEAT_PREFIX}.*", queue="mixer", cb=self._on_heartbeat))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="liveness-sweeper")
        # Guaranteed lane: the in-<rack> consumers follow the active scenario (lanes.py).
        self.lanes = LaneConsumers(nc.jetstream(), self.registry, self.scenarios)
        self.lanes.start()

    async def detach(self) -> None:
        if self.lanes is not None:
            await self.lanes.stop()
        if self._sweeper:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except (asyncio.CancelledError, Exception):
                pass
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()

    def bus_users(self) -> list[BusUser]:
        users = []
        for name, user, password, status in self.registry.bus_credentials():
            pub, sub = rack_permissions(name, full=status in FULL_BUS_STATUSES)
            users.append(BusUser(user, password, pub, sub))
        return users

    async def users_changed(self) -> None:
        if self._reload_users is not None:
            await self._reload_users(self.bus_users())

    # -- passports -------------------------------------------------------------------------------

    def _projection(self, rack: RackRow) -> tuple[dict | None, str]:
        if rack.status not in FULL_BUS_STATUSES:
            return None, ""
        active = self.scenarios.active()
        if active is None:
            return None, ""
        return project(active.doc, rack.name, rack.labels, active.digest), active.version

    def issue(self, rack: RackRow) -> bytes:
        """Sign a new passport for `rack` (with its projection when it may run one), store it."""
        scenario, version = self._projection(rack)
        now = time.time()
        expires = now + self.passport_ttl
        serial = self.registry.next_serial(rack.rack_id, expires)
        data = sign_passport(
            self.key,
            Passport(
                rack_id=rack.rack_id,
                rack_name=rack.name,
                status=rack.status,
                bus_user=rack.bus_user,
                bus_password=rack.bus_password,
                scenario=scenario,
                scenario_version=version,
                mixer_name=self.mixer_name,
                issued_at=now,
                expires_at=expires,
                serial=serial,
            ),
        )
        self.registry.record_passport(rack.rack_id, serial, expires, data, version)
        self._passports[rack.rack_id] = (serial, data)
        return data

    def current_passport(self, rack_id: str) -> tuple[int, bytes] | None:
        cached = self._passports.get(rack_id)
        if cached is not None:
            return cached
        row = self.registry.db.conn.execute("SELECT serial, data FROM passports WHERE rack_id = ?", [rack_id]).fetchone()
        if row is None:
            return None
        self._passports[rack_id] = (row[0], bytes(row[1]))
        return self._passports[rack_id]

    async def push(self, rack: RackRow, verb: str, passport: bytes | None = None, level: str | None = None, reason: str = "") -> None:
        if self.nc is None:
            return
        await self.nc.publish(S.ctrl(rack.name, verb), P.encode_ctrl(passport=passport, level=level, reason=reason))

    # -- Hello -----------------------------------------------------------------------------------

    async def _on_hello(self, msg) -> None:
        try:
            reply = await self.handle_hello(msg.data)
        except Exception as exc:  # never let one Hello kill the subscription
            log.exception("hello failed: %s", exc)
            reply = P.encode_hello_reply("denied", "internal error at the Mixer; see its log")
        if msg.reply:
            await self.nc.publish(msg.reply, reply)

    async def handle_hello(self, data: bytes) -> bytes:
        try:
            hello = P.decode_hello(data)
        except P.AgentProtocolError as exc:
            self.counters["hello_bad"] += 1
            return P.encode_hello_reply("denied", f"malformed hello: {exc}")
        if not self.bootstrap_token or not hmac.compare_digest(hello["token"].encode(), self.bootstrap_token.encode()):
            self.counters["hello_denied"] += 1
            log.warning("hello denied: wrong bootstrap token (name %r, host %r)", hello["name"], hello["host"])
            return P.encode_hello_reply("denied", "wrong bootstrap token")
        now = time.monotonic()
        cached = self._hello_cache.get(hello["reply_key"])
        rack = None
        if cached and now - cached[1] < HELLO_CACHE_TTL_S:
            rack = self.registry.find(cached[0])
        if rack is None:
            rack = self.registry.create(
                hello["name"] or hello["host"] or "rack",
                host=hello["host"],
                version=hello["version"],
                labels=hello["labels"],
                adopted=self.auto_adopt,
            )
            self._hello_cache[hello["reply_key"]] = (rack.rack_id, now)
            while len(self._hello_cache) > HELLO_CACHE_SIZE:
                self._hello_cache.popitem(last=False)
            await self.users_changed()
            if self._wait_user is not None and not await self._wait_user(rack.bus_user, rack.bus_password):
                log.warning("the Snake has not accepted rack %s's new bus user yet; it will retry", rack.name)
        self.counters["hello_ok"] += 1
        passport = self.issue(rack)
        return P.encode_hello_reply(
            "active" if rack.status == "active" else "pending",
            f"welcome to {self.mixer_name}: rack {rack.name} is {rack.status}",
            rack_name=rack.name,
            heartbeat_interval=self.heartbeat_interval,
            sealed=P.seal(hello["reply_key"], passport),
        )

    # -- heartbeats ------------------------------------------------------------------------------

    async def _on_heartbeat(self, msg) -> None:
        try:
            reply = await self.handle_heartbeat(msg.subject, msg.data)
        except Exception as exc:
            log.exception("heartbeat on %s failed: %s", msg.subject, exc)
            return
        if msg.reply and reply is not None:
            await self.nc.publish(msg.reply, reply)

    def _rack_by_name(self, name: str) -> RackRow | None:
        rack = self.registry.find(name)
        return rack if rack and rack.name == name else None

    async def handle_heartbeat(self, subject: str, data: bytes) -> bytes | None:
        name = S.rack_of_subject(subject)
        rack = self._rack_by_name(name) if name else None
        if rack is None:
            self.counters["heartbeat_unknown"] += 1
            return None
        try:
            hb = P.decode_heartbeat(data)
        except P.AgentProtocolError as exc:
            log.warning("bad heartbeat from %s: %s", name, exc)
            return None
        self.counters["heartbeats"] += 1
        self.registry.heard(rack.rack_id)
        status = rack.status
        if status == "offline":
            # Answer "active" now; the sweeper persists the move for every such Rack in one
            # transaction (a DuckDB commit is an fsync: never one per heartbeat).
            self._heard_offline.add(rack.rack_id)
            status = "active"
        if hb["apply"] != "none" or hb["scenario_version"]:
            if self.registry.report_apply(rack.rack_id, hb["scenario_version"], hb["apply"], hb["reason"]):
                log.info("rack %s scenario %s: %s %s", rack.name, hb["scenario_version"], hb["apply"], hb["reason"])
        if hb["stats"]:
            self.registry.update_info(rack.rack_id, stats=hb["stats"])
        passport = None
        current = self.current_passport(rack.rack_id)
        half_life = rack.passport_expires - self.passport_ttl / 2
        if current is None or time.time() > half_life:
            passport = self.issue(self.registry.get(rack.rack_id))
        elif hb["serial"] < current[0]:
            passport = current[1]
        return P.encode_heartbeat_reply(status, self.heartbeat_interval, passport)

    async def _sweep(self) -> None:
        period = max(0.1, min(self.heartbeat_interval / 2, 5.0))
        while True:
            await asyncio.sleep(period)
            try:
                self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("liveness sweep failed: %s", exc)

    def sweep_once(self) -> None:
        """Persist liveness: Racks heard again go back to active, silent ones go offline, and
        last_seen/stats are written; each group in one transaction."""
        heard, self._heard_offline = list(self._heard_offline), set()
        self.registry.transition_many(heard, "heard")
        silent = self.registry.silent_racks()
        for rack in self.registry.transition_many(silent, "silent", "no heartbeat"):
            log.warning("rack %s is offline (silent for %d heartbeat intervals)", rack.name, self.registry.offline_after)
        self.registry.flush_liveness()

    # -- operator actions --------------------------------------------------------------------------

    async def _after_status_change(self, before: RackRow, after: RackRow, verb: str = S.CTRL_PASSPORT) -> bytes:
        """Re-sign, push the passport (to the old name first: the Rack still listens there),
        then regenerate bus users if rights or names changed."""
        passport = self.issue(after)
        await self.push(before, verb, passport)
        if after.name != before.name:
            await self.push(after, verb, passport)
        rights_changed = (before.status in FULL_BUS_STATUSES) != (after.status in FULL_BUS_STATUSES)
        if rights_changed or before.name != after.name or after.status == "removed":
            if self.nc is not None:
                await self.nc.flush()
            await self.users_changed()
        return passport

    async def approve(self, key: str, name: str | None = None) -> RackRow:
        before = self.registry.get(key)
        if name:
            self.registry.rename(before.rack_id, name)
        after = self.registry.transition(before.rack_id, "approve", f"name={name or before.name}")
        await self._after_status_change(before, after, S.CTRL_RELOAD if self.scenarios.active() else S.CTRL_PASSPORT)
        return self.registry.get(after.rack_id)

    async def suspend(self, key: str) -> RackRow:
        before = self.registry.get(key)
        after = self.registry.transition(before.rack_id, "suspend")
        await self._after_status_change(before, after)
        return after

    async def activate(self, key: str) -> RackRow:
        before = self.registry.get(key)
        after = self.registry.transition(before.rack_id, "activate")
        await self._after_status_change(before, after, S.CTRL_RELOAD if self.scenarios.active() else S.CTRL_PASSPORT)
        return self.registry.get(after.rack_id)

    async def remove(self, key: str) -> RackRow:
        before = self.registry.get(key)
        after = self.registry.transition(before.rack_id, "remove")
        await self._after_status_change(before, after)
        return after

    async def shutdown(self, key: str, reason: str = "operator request") -> RackRow:
        rack = self.registry.get(key)
        await self.push(rack, S.CTRL_SHUTDOWN, reason=reason)
        return rack

    async def set_log_level(self, key: str, level: str) -> RackRow:
        if level not in LOG_LEVELS:
            raise FluxError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        rack = self.registry.get(key)
        await self.push(rack, S.CTRL_LOG_LEVEL, level=level)
        return rack

    # -- scenarios ---------------------------------------------------------------------------------

    def runnable_racks(self) -> list[RackRow]:
        return [r for r in self.registry.list() if r.status in FULL_BUS_STATUSES]

    def check_activation(self, stored: StoredScenario) -> None:
        racks = [(r.name, r.labels) for r in self.registry.list()]
        problems = self.scenarios.projection_problems(stored.doc, racks)
        if problems:
            raise ScenarioError(problems, f"{stored.name} {stored.version}")

    async def activate_scenario(self, stored: StoredScenario) -> list[dict]:
        """Make `stored` the active scenario and send every runnable Rack its projection."""
        self.check_activation(stored)
        self.scenarios.mark_active(stored)
        if self.lanes is not None:
            try:  # before the Racks hear of it, so their first publishes have a consumer
                await self.lanes.sync()
            except Exception:
                pass  # logged by sync(); its reconcile loop retries
        sent = []
        for rack in self.runnable_racks():
            passport = self.issue(rack)
            await self.push(rack, S.CTRL_RELOAD, passport)
            proj = project(stored.doc, rack.name, rack.labels)
            sent.append({"rack": rack.name, "version": stored.version, "gears": [g["name"] for g in proj["gears"]]})
        if self.nc is not None:
            await self.nc.flush()
        log.info("scenario %s %s active; reload sent to %d rack(s)", stored.name, stored.version, len(sent))
        return sent
