"""The control plane's behaviour: enrollment, heartbeats, passports, operator actions, activation.

Job. Everything that turns a registry change into bus traffic lives here, on the event loop:

- Hello (`fluxrig.agent.hello`, request/reply): the Hello must prove it holds the NKey it
  names (wire/identity.py). A removed identity gets `removed` (the Rack stops enrolling). A
  known identity gets its own Rack back (a retried Hello, a lost passport), never a duplicate.
  A new one needs an enrollment token (tokens.py: uses, expiry, revocation; spent here); a
  refused token gets `denied` and registers nothing. Labels come from the token, never from
  the Hello. The Rack is registered (`pending`, or `active` with auto-adopt), its NKey added
  to the Snake's users (reload, waited for), its passport signed and sealed to the Hello's
  one-use X25519 key.
- Heartbeats (`fluxrig.agent.heartbeat.<rack>`, request/reply): liveness in memory, the
  Rack's apply report stored, `offline` -> `active` when heard again; the reply carries the
  current passport when the Rack's is older (lost push) or half-way to expiry, the Mixer's
  time signed for the heartbeat's challenge (fluxrig/timesync.py: the Rack judges command
  freshness by it), and the desired kill state as a signed command while the Rack's reported
  kill-state serial is behind (commands.py: level-triggered kill).
- Operator actions (approve, suspend, activate, remove, rename): a transition through the
  state machine, the Snake's users regenerated when bus rights or names change, a fresh
  passport pushed on `flux.ctrl.<rack>.passport` (to the former name first on a rename). Shutdown and log level are signed commands (commands.py).
- Scenario activation: every projection validated first (nothing changes if one is bad),
  then one passport per Rack carrying its projection, signalled on `flux.ctrl.<rack>.reload`.

Shared state (issue 14). Every registry write goes through `self.state` (rackstate.py:
compare-and-set in JetStream KV, the DuckDB registry a read cache), on a single node as in a
cluster. Hello and heartbeats are a queue group across the nodes; each node tells the others
which Racks it heard (`fluxrig.mixer.liveness`), so whichever node holds the `sweep` lease
(lease.py) sees the whole fleet and alone moves silent Racks offline; its lease is checked
(renewed, fenced by revision) right before it writes. The sweep's DuckDB writes run in a
thread, off the event loop. Passport bytes last signed are in the passports bucket (and the
file's table `passports`), so any node answers any heartbeat without re-signing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import nats.errors

from fluxrig import ctrl as C
from fluxrig.aiotools import STOP_GRACE_S, cancel_all_and_wait, cancel_and_wait, finish_within
from fluxrig.errors import FluxError, ScenarioError
from fluxrig.passport import ClusterKey, Passport, sign_passport, verify_passport
from fluxrig.scenario.groups import group_labels
from fluxrig.timesync import sign_time
from fluxrig.wire import identity
from fluxrig.wire import messages as W
from fluxrig.wire import subjects as S
from fluxrig.wire.vocab import ApplyState, CtrlVerb, HelloStatus, RackStatus

from .coalesce import Coalesced
from .commands import CommandSender
from .groups import group_conductors, member_rights, stan_overlaps
from .kv import StateConflict, StateUnavailable, open_buckets, until_available
from .lanes import LaneConsumers
from .lease import DEFAULT_LEASE_TTL_S, Lease, LeaseLost
from .rackstate import SharedRegistry
from .ratelimit import HELLO_TOTAL_RATE, guard_heartbeat, guard_hello
from .registry import InvalidRackName, RackRow, Registry
from .rollout import (
    DEFAULT_MAX_FAILURE_RATIO,
    DEFAULT_WAVE_SIZE,
    DEFAULT_WAVE_TIMEOUT_S,
    ROLLOUT_DUTY,
    Rollouts,
)
from .scenarios import ScenarioStore, StoredScenario, project
from .snake import BusUser, rack_permissions
from .states import FULL_BUS_STATUSES, next_status
from .tokens import Grant

__all__ = [
    "Controller",
    "LOG_LEVELS",
]

log = logging.getLogger("fluxrig.mixer.controller")

LOG_LEVELS = ("trace", "debug", "info", "warning", "error")
SWEEP_DUTY = "sweep"  # the lease key of the offline sweep
#: Hellos handled at once: an enrollment waits on KV writes and a Snake reload, which the
#: others share (one reload and one token write serve all that wait); more in flight wait in
#: the subscription (the Racks retry a lost one). bench/fleet.py, one node, 2 cores: 64 at
#: once enrolled 164 Racks/s, 256 at once 326/s.
HELLO_CONCURRENCY = 256
MAX_LIVENESS_MESSAGE = 256 * 1024  # bytes of one liveness message (a fleet's share is split)


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
        wait_reloaded=None,
        tokens=None,
        node: str = "",
        replicas: int = 1,
        lease_ttl: float = DEFAULT_LEASE_TTL_S,
        ready_timeout: float = 30.0,
        wave_size: int = DEFAULT_WAVE_SIZE,
        max_failure_ratio: float = DEFAULT_MAX_FAILURE_RATIO,
        wave_timeout: float = DEFAULT_WAVE_TIMEOUT_S,
        hello_rate: float = HELLO_TOTAL_RATE,
    ):
        self.registry = registry
        self.hello_rate = hello_rate  # Hellos per second this node serves, all senders (ratelimit.py)
        self.node = node or mixer_name
        self.replicas = replicas
        self.lease_ttl = lease_ttl
        self.ready_timeout = ready_timeout  # a forming cluster may refuse the buckets for a while
        self.waves = (wave_size, max_failure_ratio, wave_timeout)
        self.rollouts: Rollouts | None = None
        self._liveness_write: asyncio.Future | None = None  # the sweeper's DuckDB write in its thread
        self.state: SharedRegistry | None = None  # set by attach(): no write without the KV
        self.lease: Lease | None = None
        self.shared_tokens = None  # tokens.SharedTokens once attached
        self.shared_scenarios = None  # scenariostate.SharedScenarios once attached
        self._heard_here: dict[str, float] = {}  # rack_id -> wall time, heard by this node since the last share
        self._stats_here: dict[str, dict] = {}
        self.scenarios = scenarios
        self.key = key
        self.bootstrap_token = bootstrap_token
        self.tokens = tokens  # tokens.TokenStore, or None: then only bootstrap_token admits
        self.mixer_name = mixer_name
        self.auto_adopt = auto_adopt
        self.heartbeat_interval = heartbeat_interval
        self.passport_ttl = passport_ttl
        self._reload_users = reload_users  # async callable(list[BusUser])
        self._wait_reloaded = wait_reloaded  # async callable() -> bool: the Snake runs the new users
        # Concurrent Hellos share reloads (coalesce.py): one SIGHUP serves every Rack waiting.
        self._users_reload = Coalesced(self._reload_and_probe)
        self._hello_slots = asyncio.Semaphore(HELLO_CONCURRENCY)
        self._hello_tasks: set[asyncio.Task] = set()
        self.nc = None
        self._subs = []
        self._passports: dict[str, tuple[int, bytes]] = {}  # rack_id -> last signed (serial, bytes)
        self._sweeper: asyncio.Task | None = None
        self.lanes: LaneConsumers | None = None
        self.stan_overlaps: list[str] = []  # issue 17: overlapping STAN ranges in a group, as text
        # Signed commands (shutdown, log level; the kill state in heartbeat replies). The app
        # shares its own sender here; otherwise one is made on attach.
        self.commands: CommandSender | None = None
        self._storage_failed: dict[str, tuple[str, ...]] = {}  # rack id -> WALs its heartbeat says failed
        self.counters = {"hello_ok": 0, "hello_denied": 0, "hello_bad": 0, "hello_removed": 0, "heartbeats": 0,
                         "heartbeat_unknown": 0}  # fmt: skip
        self._heard_offline: set[str] = set()  # offline Racks heard again, persisted by the sweeper
        self.counters.update(sweeps=0, sweep_writes_s=0.0, liveness_in=0)

    # -- wiring ----------------------------------------------------------------------------------

    async def attach(self, nc) -> None:
        self.nc = nc
        if self.commands is None:
            self.commands = CommandSender(self.registry, self.key, nc)
        # The shared state first: the cache holds every node's Racks before any Hello is served.
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                buckets = await open_buckets(nc.jetstream(), self.replicas)
                break
            except (TimeoutError, nats.errors.Error) as exc:  # no quorum yet, no meta leader yet
                if time.monotonic() > deadline:
                    raise FluxError(f"the shared state's buckets could not be opened: {exc!r}") from None
                log.info("waiting for the cluster's JetStream to open the shared state: %r", exc)
                await asyncio.sleep(0.5)
        self.state = SharedRegistry(self.registry, buckets, self.node, on_bus_change=self.users_changed)
        await self.state.start(timeout=self.ready_timeout)
        self.commands.shared = self.state  # control commands' audit rows: in every node's rack_events
        from .scenariostate import SharedScenarios

        self.shared_scenarios = SharedScenarios(self.scenarios, buckets.scenarios, buckets.state, self.node,
                                                self.replicas)  # fmt: skip
        self.shared_scenarios.on_active = self._activated_elsewhere
        await self.shared_scenarios.start(timeout=self.ready_timeout)
        self.rollouts = Rollouts(self, buckets.state, Lease(buckets.leases, ROLLOUT_DUTY, self.node, self.lease_ttl),
                                 *self.waves)  # fmt: skip
        await self.rollouts.start()
        if self.tokens is not None:  # enrollment tokens counted cluster-wide (tokens.SharedTokens)
            from .tokens import SharedTokens

            self.shared_tokens = SharedTokens(self.tokens, buckets.tokens)
            await until_available(self.shared_tokens.push, self.ready_timeout)
            self.shared_tokens.start()
        await self.users_changed()  # the users as the shared state has them (another node's Racks)
        self.lease = Lease(buckets.leases, SWEEP_DUTY, self.node, self.lease_ttl)
        self.lease.start()
        self._subs.append(await nc.subscribe(S.MIXER_LIVENESS, cb=self._on_liveness))
        # A queue group lets a second Mixer node share the work (ARCHITECTURE §10).
        # Rate-limited per sender before any work (ratelimit.py).
        hello_cb = guard_hello(self._hello_task, total_rate=self.hello_rate)
        beat_cb = guard_heartbeat(self._on_heartbeat, self.heartbeat_interval)
        self._guards = {"hello": hello_cb, "heartbeat": beat_cb}  # their drops: dropped()
        self._subs.append(await nc.subscribe(S.HELLO, queue="mixer", cb=hello_cb))
        self._subs.append(await nc.subscribe(S.heartbeat_all(), queue="mixer", cb=beat_cb))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="liveness-sweeper")
        # Guaranteed lane: the in-<rack> consumers follow the active scenario (lanes.py).
        self.lanes = LaneConsumers(nc.jetstream(), self.registry, self.scenarios, nc=nc, replicas=self.replicas)
        self.lanes.start()

    def dropped(self) -> dict[str, int]:
        """Messages dropped before any work since attach (ratelimit.py): `hello` and
        `heartbeat` over their sender's rate, `*_oversized` past their size cap."""
        out = {}
        for what, guard in getattr(self, "_guards", {}).items():
            out[what] = guard.limiter.refused
            out[f"{what}_oversized"] = guard.oversized.refused
        return out

    async def detach(self) -> None:
        """Stop every worker, each step bounded (aiotools): a Mixer that is stopping must
        stop, whatever state the bus or a worker is in."""
        await cancel_all_and_wait(list(self._hello_tasks))
        await finish_within(self._users_reload.close(), STOP_GRACE_S, "the users reload")
        if self.lanes is not None:
            await self.lanes.stop()
        await cancel_and_wait(self._sweeper)
        if self._liveness_write is not None and not self._liveness_write.done():
            # the file is closed after this: the writer thread must be done with it
            await finish_within(asyncio.shield(self._liveness_write), 10, "the last liveness write")
        for part, name in ((self.shared_tokens, "tokens"), (self.shared_scenarios, "scenarios"),
                           (self.rollouts, "rollouts"), (self.lease, "sweep lease"), (self.state, "registry")):  # fmt: skip
            if part is not None:  # the lease is released: the next node takes the sweep at once
                await finish_within(part.stop(), 2 * STOP_GRACE_S, f"stopping the shared {name}")
        await asyncio.to_thread(self.registry.close_writer)  # queued file writes done before the file closes
        for sub in self._subs:
            await finish_within(sub.unsubscribe(), 2.0, f"unsubscribing {sub.subject}")
        self._subs.clear()

    def bus_users(self) -> list[BusUser]:
        users = []
        active = self.scenarios.active()
        labels = {r.name: r.labels for r in self.registry.list()} if active is not None else {}
        for name, nkey, status in self.registry.bus_identities():
            full = status in FULL_BUS_STATUSES
            groups = member_rights(active.doc, labels.get(name)) if active is not None else []
            pub, sub = rack_permissions(name, full=full, groups=groups)
            # allow_responses: an active Rack may answer the requests it receives (the Mixer's
            # signed `saf` command, issue 16), on their reply subject only, once each.
            users.append(BusUser(nkey, pub, sub, allow_responses=full))
        return users

    async def users_changed(self, wait: bool = False) -> None:
        """Regenerate the Snake's users and wait until it runs them (a Rack told its passport
        at once must find its identity accepted). Callers at the same time share one reload
        (coalesce.py); `wait` logs when the Snake did not confirm it."""
        if self._reload_users is not None and not await self._users_reload() and wait:
            log.warning("the Snake has not applied the new users yet; the Rack will retry")

    async def _reload_and_probe(self) -> bool:
        await self._reload_users(self.bus_users())
        return True if self._wait_reloaded is None else await self._wait_reloaded()

    # -- passports -------------------------------------------------------------------------------

    def _projection(self, rack: RackRow) -> tuple[dict | None, str]:
        if rack.status not in FULL_BUS_STATUSES:
            return None, ""
        active = self.scenarios.active()
        assigned = self.rollouts.assigned(rack.rack_id) if self.rollouts is not None else None
        if assigned is not None:  # a roll-out is under way and this Rack's wave has not started
            active = self.scenarios.get(assigned) if assigned else None
        if active is None:
            return None, ""
        return project(active.doc, rack.name, rack.labels, active.digest), active.version

    def _state(self) -> SharedRegistry:
        if self.state is None:
            raise StateUnavailable("fluxrig-racks", "*", "the Mixer is not connected to the Snake")
        return self.state

    async def issue(self, rack: RackRow) -> bytes:
        """Sign a new passport for `rack` (with its projection when it may run one), store it.
        The serial is reserved in the shared state first (two nodes: two serials)."""
        _, version = self._projection(rack)
        now = time.time()
        expires = now + self.passport_ttl
        rack = await self._state().reserve_serial(rack.rack_id, expires, version)
        serial = rack.passport_serial
        scenario, version = self._projection(rack)
        data = sign_passport(
            self.key,
            Passport(
                rack_id=rack.rack_id,
                rack_name=rack.name,
                status=rack.status,
                bus_user=rack.bus_user,
                scenario=scenario,
                scenario_version=version,
                mixer_name=self.mixer_name,
                issued_at=now,
                expires_at=expires,
                serial=serial,
            ),
        )
        await self.state.store_passport(rack.rack_id, data)
        self.registry.store_passport(rack.rack_id, serial, data)  # the file, in the writer thread
        self._passports[rack.rack_id] = (serial, data)
        return data

    def has_passport(self, rack_id: str) -> bool:
        """A passport was signed for this Rack by this node (benchmarks wait for it)."""
        return rack_id in self._passports

    async def current_passport(self, rack_id: str) -> tuple[int, bytes] | None:
        """The passport last signed for the Rack, by any node: memory, the file, the KV."""
        want = self.registry.get(rack_id, include_removed=True).passport_serial
        cached = self._passports.get(rack_id)
        if cached is not None and cached[0] >= want:
            return cached
        row = self.registry.db.conn.execute(
            "SELECT serial, data FROM passports WHERE rack_id = ?", [rack_id]
        ).fetchone()
        if row is not None and row[0] >= want:
            self._passports[rack_id] = (row[0], bytes(row[1]))
            return self._passports[rack_id]
        if self.state is not None:
            data = await self.state.load_passport(rack_id)  # signed by another node
            if data is not None:
                serial = verify_passport(data, [self.key.public_key]).serial  # ours: every node holds the key
                self._passports[rack_id] = (serial, data)
                return self._passports[rack_id]
        return None

    async def push(self, rack: RackRow, verb: str, passport: bytes) -> None:
        """A signed passport on `flux.ctrl.<rack>.<verb>` (reload, passport)."""
        if self.nc is None:
            return
        await self.nc.publish(S.ctrl(rack.name, verb), W.CtrlMessage(passport).encode())

    # -- Hello -----------------------------------------------------------------------------------

    async def _hello_task(self, msg) -> None:
        """Each Hello in its own task, at most HELLO_CONCURRENCY at once: enrollments wait on
        the shared state and a reload, and many share both."""
        await self._hello_slots.acquire()
        task = asyncio.get_running_loop().create_task(self._hello_in_slot(msg), name="hello")
        self._hello_tasks.add(task)
        task.add_done_callback(self._hello_tasks.discard)

    async def _hello_in_slot(self, msg) -> None:
        try:
            await self._on_hello(msg)
        finally:
            self._hello_slots.release()

    async def _on_hello(self, msg) -> None:
        try:
            reply = await self.handle_hello(msg.data)
        except (StateConflict, StateUnavailable) as exc:  # nothing was written: the Rack's retry is safe
            log.warning("hello not answered now: %s", exc)
            reply = W.HelloReply(HelloStatus.DENIED, f"the Mixer's shared state is busy ({exc}); retry").encode()
        except Exception as exc:  # never let one Hello kill the subscription
            log.exception("hello failed: %s", exc)
            reply = W.HelloReply(HelloStatus.DENIED, "internal error at the Mixer; see its log").encode()
        if msg.reply:
            await self.nc.publish(msg.reply, reply)

    async def _check_token(self, hello: W.Hello) -> Grant:
        """A Grant (labels, Rack name, token id) when the Hello's enrollment token admits a new
        Rack, else one whose `refused` says why. With a token store (tokens.py) a use is spent
        here; without one only `bootstrap_token` admits (unit tests)."""
        if self.shared_tokens is not None:
            return await self.shared_tokens.consume(hello.token, rack_name=hello.name)
        if self.tokens is not None:
            return self.tokens.consume(hello.token, rack_name=hello.name)
        if not self.bootstrap_token or not hmac.compare_digest(hello.token.encode(), self.bootstrap_token.encode()):
            return Grant("wrong enrollment token")
        return Grant()

    async def handle_hello(self, data: bytes) -> bytes:
        try:
            hello = W.Hello.decode(data)
        except W.WireError as exc:
            self.counters["hello_bad"] += 1
            return W.HelloReply(HelloStatus.DENIED, f"malformed hello: {exc}").encode()
        if not hello.nkey:
            self.counters["hello_bad"] += 1
            return W.HelloReply(HelloStatus.DENIED, "the Hello names no bus identity (nkey): upgrade the Rack").encode()
        try:
            identity.verify_proof(hello.nkey, hello.reply_key, hello.nkey_sig)
        except identity.IdentityError as exc:
            self.counters["hello_bad"] += 1
            log.warning("hello refused: %s (name %r, host %r)", exc, hello.name, hello.host)
            return W.HelloReply(HelloStatus.DENIED, str(exc)).encode()
        state = self._state()
        if self.registry.is_denied(hello.nkey):
            self.counters["hello_removed"] += 1
            log.warning("hello refused: identity %s was removed (name %r, host %r)", hello.nkey, hello.name, hello.host)
            return W.HelloReply(
                HelloStatus.REMOVED,
                "this rack was removed by the operator and stays out; to join again it needs a new identity "
                "(delete identity.nkey in its state dir) and a new enrollment token",
            ).encode()
        rack = await state.rack_of_identity(hello.nkey)
        if rack is None:
            grant = await self._check_token(hello)
            if grant.refused:
                self.counters["hello_denied"] += 1
                log.warning("hello denied: %s (name %r, host %r)", grant.refused, hello.name, hello.host)
                return W.HelloReply(HelloStatus.DENIED, grant.refused).encode()
            labels = dict(grant.labels)
            if hello.labels and hello.labels != labels:
                log.info("rack %r asked for labels %s: ignored (labels come from the token or the operator)",
                         hello.name, hello.labels)  # fmt: skip
            try:
                rack = await state.create(
                    grant.rack_name or hello.name or hello.host or "rack",
                    host=hello.host,
                    version=hello.version,
                    labels=labels,
                    adopted=self.auto_adopt,
                    nkey=hello.nkey,
                    detail=f"token={grant.token_id}" if grant.token_id else "",
                )
            except FluxError:
                # Removed meanwhile, or enrolled by another node a moment ago (a retried Hello
                # answered by two nodes): the shared state says which.
                rack = await state.rack_of_identity(hello.nkey)
                if rack is None:
                    self.counters["hello_removed"] += 1
                    return W.HelloReply(HelloStatus.REMOVED, "this rack's identity was removed; it stays out").encode()
            await self.users_changed(wait=True)
        else:
            # It holds the key of a Rack we know (it proved it): its own Rack back, no token
            # needed (a retried Hello, a Rack that lost its passport file).
            log.info("rack %s said Hello again with its own identity", rack.name)
        self.counters["hello_ok"] += 1
        passport = await self.issue(rack)
        return W.HelloReply(
            HelloStatus.ACTIVE if rack.status == RackStatus.ACTIVE else HelloStatus.PENDING,
            f"welcome to {self.mixer_name}: rack {rack.name} is {rack.status}",
            rack_name=rack.name,
            heartbeat_interval=self.heartbeat_interval,
            sealed=W.seal(hello.reply_key, passport),
        ).encode()

    # -- heartbeats ------------------------------------------------------------------------------

    async def _on_heartbeat(self, msg) -> None:
        try:
            reply = await self.handle_heartbeat(msg.subject, msg.data)
        except Exception as exc:
            log.exception("heartbeat on %s failed: %s", msg.subject, exc)
            return
        if msg.reply and reply is not None:
            await self.nc.publish(msg.reply, reply)

    def _storage_changed(self, rack: RackRow, failed: tuple[str, ...]) -> None:
        """One ERROR when a Rack's heartbeat first says a WAL of it refuses writes (a full disk:
        the Rack drops telemetry, or holds guaranteed sends), one line when it healed."""
        before = self._storage_failed.get(rack.rack_id, ())
        if tuple(failed) == before:
            return
        if failed:
            self._storage_failed[rack.rack_id] = tuple(failed)
            log.error("rack %s: its %s WAL refuses writes (storage full or failing on the Rack); it heals by "
                      "itself once space returns", rack.name, " and ".join(failed))  # fmt: skip
        else:
            self._storage_failed.pop(rack.rack_id, None)
            log.warning("rack %s: its %s WAL takes writes again", rack.name, " and ".join(before))

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
            hb = W.Heartbeat.decode(data)
        except W.WireError as exc:
            log.warning("bad heartbeat from %s: %s", name, exc)
            return None
        self.counters["heartbeats"] += 1
        self.registry.heard(rack.rack_id)
        self._heard_here[rack.rack_id] = time.time()
        status = rack.status
        if status == RackStatus.OFFLINE:
            # Answer "active" now; the sweeper persists the move for every such Rack in one
            # transaction (a DuckDB commit is an fsync: never one per heartbeat).
            self._heard_offline.add(rack.rack_id)
            status = RackStatus.ACTIVE
        if hb.apply != ApplyState.NONE or hb.scenario_version:
            if await self._state().report_apply(rack.rack_id, hb.scenario_version, str(hb.apply), hb.reason):
                log.info("rack %s scenario %s: %s %s", rack.name, hb.scenario_version, hb.apply, hb.reason)
        if hb.stats:
            self.registry.update_info(rack.rack_id, stats=hb.stats)
            self._stats_here[rack.rack_id] = hb.stats
        self._storage_changed(rack, hb.storage_failed)
        passport = None
        current = await self.current_passport(rack.rack_id)
        half_life = rack.passport_expires - self.passport_ttl / 2
        if current is None or time.time() > half_life:
            passport = await self.issue(self.registry.get(rack.rack_id))
        elif hb.serial < current[0]:
            passport = current[1]
        stamp = sign_time(self.key, rack.rack_id, hb.challenge) if hb.challenge else b""
        command = self.commands.desired_command(rack, hb.stats) if self.commands is not None else b""
        return W.HeartbeatReply(status, self.heartbeat_interval, passport, time=stamp, command=command).encode()

    def sweep_period(self) -> float:
        return max(0.1, min(self.heartbeat_interval / 2, 5.0))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_period())
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("liveness sweep failed: %s", exc)

    async def sweep_once(self) -> None:
        """Share what this node heard, move Racks heard again back to active (any node: it
        heard them), and, on the node holding the sweep lease only, silent Racks offline.
        last_seen/stats are written to the file in a thread (never on the loop)."""
        self.counters["sweeps"] += 1
        await self._share_liveness()
        heard, self._heard_offline = list(self._heard_offline), set()
        if heard:
            await self._state().transition_many(heard, "heard")
        if self.lease is not None and self.lease.held:
            silent = self.registry.silent_racks()
            if silent:
                try:
                    await self.lease.check()  # renewed and fenced right before the write
                except LeaseLost as exc:
                    log.info("offline sweep skipped: %s", exc)
                    silent = []
                for rack in await self._state().transition_many(silent, "silent", "no heartbeat"):
                    log.warning(
                        "rack %s is offline (silent for %d heartbeat intervals)", rack.name, self.registry.offline_after
                    )
        seen, stats = self.registry.take_liveness()
        if seen or stats:
            t0 = time.perf_counter()
            # Shielded and remembered: a cancelled sweeper must not leave a write running in the
            # thread while the file closes (detach() waits for it).
            self._liveness_write = asyncio.get_running_loop().run_in_executor(
                None, self.registry.write_liveness, seen, stats
            )
            await asyncio.shield(self._liveness_write)
            self.counters["sweep_writes_s"] += time.perf_counter() - t0
        self._check_stan_ranges()

    def _check_stan_ranges(self) -> None:
        """Issue 17: members of a group must originate disjoint reversal STANs; an ERROR while
        two overlap (once per change), `stan_overlaps` for the API and tests."""
        active = self.scenarios.active()
        doc = active.doc if active is not None else None
        found = [str(o) for o in stan_overlaps(doc, self.registry.list())] if group_conductors(doc) else []
        if found != self.stan_overlaps:
            for text in found[:10]:
                log.error("%s", text)
            if not found and self.stan_overlaps:
                log.info("reversal STAN ranges of every group are disjoint again")
        self.stan_overlaps = found

    async def _share_liveness(self) -> None:
        """Tell the other nodes which Racks this node heard (and their stats) since the last
        sweep: core NATS, at most MAX_LIVENESS_MESSAGE bytes a message. A lost message costs
        at most one sweep period of a Rack's liveness (offline_after is several intervals)."""
        if self.nc is None or not self._heard_here:
            return
        heard, self._heard_here = self._heard_here, {}
        stats, self._stats_here = self._stats_here, {}
        part: dict = {"node": self.node, "heard": {}, "stats": {}}
        size = 0
        for rack_id, wall in heard.items():
            st = stats.get(rack_id)
            cost = len(rack_id) + 24 + (len(json.dumps(st, default=str)) if st else 0)
            if size + cost > MAX_LIVENESS_MESSAGE and part["heard"]:
                await self.nc.publish(S.MIXER_LIVENESS, json.dumps(part, default=str).encode())
                part, size = {"node": self.node, "heard": {}, "stats": {}}, 0
            part["heard"][rack_id] = wall
            if st:
                part["stats"][rack_id] = st
            size += cost
        await self.nc.publish(S.MIXER_LIVENESS, json.dumps(part, default=str).encode())

    async def _on_liveness(self, msg) -> None:
        try:
            part = json.loads(msg.data)
            if part.get("node") == self.node:
                return
            self.counters["liveness_in"] += 1
            rows = self.registry._cache()
            for rack_id, wall in part.get("heard", {}).items():
                if rack_id in rows:
                    self.registry.heard_at(rack_id, float(wall))
                    if rows[rack_id].status == RackStatus.OFFLINE:
                        self._heard_offline.add(rack_id)
            for rack_id, st in part.get("stats", {}).items():
                if rack_id in rows and isinstance(st, dict):
                    self.registry.update_info(rack_id, stats=st)
        except Exception as exc:  # a malformed share from a node must not stop the others
            log.warning("liveness share from %s ignored: %s", msg.subject, exc)

    # -- operator actions --------------------------------------------------------------------------

    async def _after_status_change(self, before: RackRow, after: RackRow, verb: str = CtrlVerb.PASSPORT) -> bytes:
        """Re-sign, push the passport (to the old name first: the Rack still listens there),
        then regenerate bus users if rights or names changed."""
        passport = await self.issue(after)
        await self.push(before, verb, passport)
        if after.name != before.name:
            await self.push(after, verb, passport)
        rights_changed = (before.status in FULL_BUS_STATUSES) != (after.status in FULL_BUS_STATUSES)
        if rights_changed or before.name != after.name or after.status == RackStatus.REMOVED:
            if self.nc is not None:
                await self.nc.flush()
            await self.users_changed()
        return passport

    async def _move(self, before: RackRow, event: str, detail: str = "", rename: str | None = None) -> RackRow:
        """An operator move through the shared state. Without it (no bus) a move the state
        machine refuses is still refused as such (409), any other is StateUnavailable (503)."""
        if self.state is None:
            next_status(before.name, before.status, event)
        return await self._state().transition(before.rack_id, event, detail, rename=rename)

    async def approve(self, key: str, name: str | None = None) -> RackRow:
        before = self.registry.get(key)
        after = await self._move(before, "approve", f"name={name or before.name}", rename=name)
        await self._after_status_change(
            before, after, CtrlVerb.RELOAD if self.scenarios.active() else CtrlVerb.PASSPORT
        )
        return self.registry.get(after.rack_id)

    async def suspend(self, key: str) -> RackRow:
        before = self.registry.get(key)
        after = await self._move(before, "suspend")
        await self._after_status_change(before, after)
        return after

    async def activate(self, key: str) -> RackRow:
        before = self.registry.get(key)
        after = await self._move(before, "activate")
        await self._after_status_change(
            before, after, CtrlVerb.RELOAD if self.scenarios.active() else CtrlVerb.PASSPORT
        )
        return self.registry.get(after.rack_id)

    async def remove(self, key: str) -> RackRow:
        """Remove: the identity is denied for good (registry), dropped from the Snake's users,
        and its guaranteed-lane consumer deleted now, so a later Rack of the same name starts
        with nothing addressed to this one."""
        before = self.registry.get(key)
        after = await self._move(before, "remove")
        await self._after_status_change(before, after)
        if self.lanes is not None:
            try:
                await self.lanes.sync()
            except Exception:
                pass  # logged by sync(); its reconcile deletes the consumer later (lanes.py)
        return after

    async def rename(self, key: str, new_name: str, actor: str = "api") -> RackRow:
        """Rename a Rack in any status but removed (the status stays; issue 13). The Rack gets
        a passport with its new name (pushed to the former name, which it still listens on,
        then to the new one), the Snake's users are re-rendered for the new subjects, and the
        guaranteed-lane consumers follow (`in-<new>`). A Rack away meanwhile learns the name
        when it comes back: the Snake refuses its former heartbeat subject, and it asks for
        its passport with a Hello (fluxrig/agent/agent.py); records it queued under the former
        name are sent under the new one (lane_codec.py, `migrated`).

        The active scenario is projected by name: a scenario placing gears on the former name
        only gives the renamed Rack no new projection until a version naming it is activated
        (it keeps running what it runs). Same name: nothing done. InvalidRackName (400),
        NameConflict (409), IllegalTransition (409: a removed Rack, named by its id; its former
        name is no Rack's any more: RackNotFound, 404)."""
        before = self.registry.get(key, include_removed=True)
        if not isinstance(new_name, str) or not S.RACK_NAME_RE.match(new_name) or len(new_name) > S.MAX_RACK_NAME:
            raise InvalidRackName(str(new_name))
        if new_name == before.name:
            next_status(before.name, before.status, "rename")  # still refused for a removed Rack
            return before
        after = await self._move(before, "rename", f"name={before.name}->{new_name} by={actor}", rename=new_name)
        await self._after_status_change(
            before, after, CtrlVerb.RELOAD if self.scenarios.active() else CtrlVerb.PASSPORT
        )
        if self.lanes is not None:
            try:
                await self.lanes.sync()
            except Exception:
                pass  # logged by sync(); its reconcile loop retries
        log.info("rack %s (%s) renamed %s by %s", after.name, after.rack_id, before.name, actor)
        return self.registry.get(after.rack_id)

    def _sender(self) -> CommandSender:
        if self.commands is None:
            self.commands = CommandSender(self.registry, self.key, self.nc)
            self.commands.shared = self.state
        return self.commands

    async def shutdown(self, key: str, reason: str = "operator request", actor: str = "api") -> RackRow:
        """A signed `shutdown` (the Rack drains and exits 0); not waited for."""
        await self._sender().send(key, C.CMD_SHUTDOWN, reason=reason, wait=0, actor=actor)
        return self.registry.get(key)

    async def set_log_level(self, key: str, level: str, actor: str = "api") -> RackRow:
        """A signed `log-level`; not waited for."""
        if level not in LOG_LEVELS:
            raise FluxError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        await self._sender().send(key, C.CMD_LOG_LEVEL, level=level, reason=f"log level {level}", wait=0,
                                  actor=actor)  # fmt: skip
        return self.registry.get(key)

    # -- scenarios ---------------------------------------------------------------------------------

    def runnable_racks(self) -> list[RackRow]:
        return [r for r in self.registry.list() if r.status in FULL_BUS_STATUSES]

    def check_activation(self, stored: StoredScenario) -> None:
        racks = [(r.name, r.labels) for r in self.registry.list()]
        problems = self.scenarios.projection_problems(stored.doc, racks)
        if problems:
            raise ScenarioError(problems, f"{stored.name} {stored.version}")

    async def _activated_elsewhere(self, stored: StoredScenario) -> None:
        """Another node activated `stored` (it sends the Racks their passports): this node's
        bus users (group rights, issue 17) and lane consumers follow it."""
        await self.users_changed()
        if self.lanes is not None:
            try:
                await self.lanes.sync()
            except Exception:
                pass  # logged by sync(); its reconcile loop retries

    async def activate_scenario(self, stored: StoredScenario) -> list[dict]:
        """Make `stored` the active scenario and send every runnable Rack its projection."""
        self.check_activation(stored)
        if self.shared_scenarios is None:
            raise StateUnavailable("fluxrig-state", "active", "the Mixer is not connected to the Snake")
        previous = self.scenarios.active()
        await self.shared_scenarios.activate(stored)  # CAS: two nodes activating at once, one 409
        if group_labels(stored.doc) or (previous is not None and group_labels(previous.doc)):
            # Issue 17: members' rights to their groups' consumers and relays follow the scenario.
            await self.users_changed(wait=True)
        if self.lanes is not None:
            try:  # before the Racks hear of it, so their first publishes have a consumer
                await self.lanes.sync()
            except Exception:
                pass  # logged by sync(); its reconcile loop retries
        racks = self.runnable_racks()
        plan = await self.rollouts.begin(stored, previous.digest if previous else "", [r.rack_id for r in racks])
        try:
            await self.rollouts.kick()  # this node drives it: the first wave goes out now
        except Exception as exc:  # the driver (this node or the lease holder) retries
            log.warning("roll-out of %s: first wave not sent yet: %s", stored.version, exc)
        first = set(plan["waves"][0])
        sent = []
        for rack in racks:
            if rack.rack_id in first:
                proj = project(stored.doc, rack.name, rack.labels)
                sent.append({"rack": rack.name, "version": stored.version, "gears": [g["name"] for g in proj["gears"]]})
        log.info(
            "scenario %s %s active; roll-out in %d wave(s) of up to %d: the first to %d rack(s)",
            stored.name, stored.version, len(plan["waves"]), self.rollouts.wave_size, len(sent),
        )  # fmt: skip
        return sent

    async def send_scenario(self, rack_ids: list[str]) -> int:
        """A new passport (its projection) and a reload signal to each of these Racks that may
        run a scenario (rollout.py calls it for one wave)."""
        n = 0
        for rack_id in rack_ids:
            rack = self.registry.find(rack_id)
            if rack is None or rack.status not in FULL_BUS_STATUSES:
                continue
            passport = await self.issue(rack)
            await self.push(rack, CtrlVerb.RELOAD, passport)
            n += 1
        if self.nc is not None:
            await self.nc.flush()
        return n
