"""JetStreamBus: the guaranteed lane over the Snake (JetStream), Rack side.

Implements the runtime's bus contract (fluxrig/runtime/bus.py) for a Rack joined to a Mixer.

Outbound (`outbound(subject).put(msg)`). The message is CBOR-encoded and appended to the
Rack's *lane WAL* (an AsyncWal at `<store_dir>/lanes`, separate from the telemetry WAL;
fsync before acknowledging unless `store.wal_fsync = never`, see `open_lane_wal`) as the
record `[subject, dedup id, msg CBOR]`; `put` returns once the record is durable per that
policy. That wait is the guaranteed lane's backpressure: an emitter never runs ahead of the
disk. A publisher task ships records in WAL order to JetStream with
`Nats-Msg-Id = dedup_id(msg, subject)` and at most `max_inflight` unacknowledged publishes;
a record is acknowledged in the WAL only after its JetStream PubAck (on disk at the Snake),
so the WAL may then delete it. While the Snake is unreachable, or the passport does not allow
traffic, records simply wait in the WAL (offline operation) and flow when it returns. A failed
publish is retried from the first failed record; the stream's duplicate window drops what
was already stored. The backlog (unacknowledged bytes) is capped at `max_backlog_bytes`: past
it `put` waits up to `send_timeout` for the publisher, then raises LaneFull (the gear's error
convention), rather than silently dropping the oldest records as the telemetry WAL does.
Records for a subject of another Rack (this Rack was renamed) can never be published with
this Rack's credentials: they are acknowledged and counted in `foreign_dropped`.

Inbound (`inbound(subject, consumer, gear, port)`). One pull loop per Rack fetches from its
durable consumer `in-<rack>` on stream `flux-msg` (created by the Mixer with the source
subjects of every wire into this Rack as its filter). Each message is routed by subject to
every registered input (gear, port) through that input's bounded queue (`inbound_capacity`;
a full queue stops the fetching: backpressure to JetStream, which holds the rest), processed
in order by one task per input, and acknowledged only after every input it went to has
processed it. Delivery is at least once from JetStream; a bounded LRU of recently processed
dedup ids (`dedup_capacity`) plus the set of ids being processed mask redeliveries, so a gear
sees each message once. A message on a subject with no registered input is NAKed with a delay
(`stale_nak_delay`: a reload may be registering it) and, after `stale_after_deliveries`
deliveries, acknowledged and counted in `stale_acked` (stale wiring at the Mixer). The loop
waits for `agent.connected`, rebinds after a new bus session, and backs off on errors.
Fetching pauses while inputs drain (`join`) and during a reload (`hold()`, used by the Rack
around its shadow swap), so a message never reaches both an input and its replacement, and
while every input's gear is stopped (kill switch): a killed gear's messages wait in JetStream
(what its queue held is NAKed back) until it is revived; a killed gear among live ones misses
what arrives meanwhile, as on a hot lane.

Order. Per input, messages are processed in stream order. Publishes are pipelined, so after a
lost connection a record whose publish was lost can be stored after later records of the same
window (at most `max_inflight`): order across a Snake outage is best effort, loss and
duplication are not.

Limits of "once". A Rack killed (SIGKILL, power) after a PubAck but before its WAL cursor was
persisted (at most `cursor_sync_ms`, 200 ms) re-sends those records on restart: JetStream
drops them within its duplicate window (flux-msg: 120 s), the receiving Rack's LRU while it
remembers them. A receiving Rack killed after its gear processed a message but before the
ack gets it again (at least once). A graceful stop acks what was processed and NAKs the rest.

Nothing here decides wiring: the runtime asks for targets and sources (graph.py) and the
Mixer keeps the consumer's filter in step with the active scenario (fluxrig_mixer.lanes).
Raises: LaneFull from `put` (backlog cap), WalFailed/WalClosed from the lane WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict, deque

import cbor2

from ..errors import FluxError, LaneFull, ScenarioError, ScenarioProblem
from ..msg import FluxMsg
from ..runtime.bus import OutboundTarget, dedup_id
from ..runtime.lane import deliver
from ..scenario import build_scenario
from ..scenario.model import Endpoint, WireSpec
from . import subjects as S

__all__ = [
    "JetStreamBus",
    "open_lane_wal",
    "scenario_from_projection",
    "LANE_WAL_DIR",
    "SHIPPABLE_STATUSES",
]

log = logging.getLogger("fluxrig.agent.lanes")

LANE_WAL_DIR = "lanes"
SHIPPABLE_STATUSES = ("active", "offline")
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_PUBLISH_TIMEOUT_S = 5.0
DEFAULT_FETCH_BATCH = 256
DEFAULT_FETCH_TIMEOUT_S = 1.0
DEFAULT_INBOUND_CAPACITY = 1024
DEFAULT_DEDUP_CAPACITY = 65536
DEFAULT_MAX_BACKLOG_BYTES = 500 * 1024 * 1024
DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_RETRY_WAIT_S = 0.5
DEFAULT_IDLE_WAIT_S = 0.25
STALE_AFTER_DELIVERIES = 5
STALE_NAK_DELAY_S = 1.0
CLOSE_WAIT_S = 3.0
MSG_ID_HEADER = "Nats-Msg-Id"
#: store.wal_fsync -> the lane WAL's policy (see open_lane_wal).
LANE_FSYNC = {"always": "always", "batch": "always", "never": "never"}


async def open_lane_wal(config, fsync: str | None = None):
    """The lane WAL for a Rack's fluxrig Config: `<store_dir>/lanes`, no size cap in the WAL
    itself (JetStreamBus applies `store.wal_max_size_mb` as backpressure), and the fsync policy
    `LANE_FSYNC[store.wal_fsync]` unless `fsync` names one.

    Why `batch` becomes `always` here: every lane append is awaited by its emitter, so under
    `batch` each emitter would wait out the whole window per message (20 msg/s per emitter at
    50 ms: measured, bench/guaranteed_lane.py). `always` keeps the same promise (fdatasync
    before the append is acknowledged) and already shares one fdatasync among the appends
    that arrive while one runs (group commit). `never` stays `never` (no fsync: the operator
    chose to trust the page cache)."""
    from ..wal import AsyncWal
    from ..wal.log import options_from_config

    options = options_from_config(config)
    options["max_size_bytes"] = None
    options["fsync"] = fsync or LANE_FSYNC.get(options["fsync"], options["fsync"])
    return await AsyncWal.open(os.path.join(config.store_dir, LANE_WAL_DIR), **options)


def scenario_from_projection(doc: dict, rack: str, source=None):
    """The Scenario a Rack runs from its passport's projection (fluxrig_mixer.scenarios.project).

    The projection lists only this Rack's gears; wires with one end on another Rack are in
    `x-remote-wires`. They become guaranteed wires with explicit rack endpoints (the remote
    rack taken from the entry's subject for the source end), which the runtime turns into bus
    targets and sources. Raises ScenarioError when the projection or a remote wire is bad.
    """
    scenario = build_scenario(doc, source=source)
    problems = []
    for i, entry in enumerate(doc.get("x-remote-wires") or []):
        loc = f"x-remote-wires[{i}]"
        try:
            src = Endpoint.parse(str(entry["from"]))
            dst = Endpoint.parse(str(entry["to"]))
            direction = entry.get("direction")
            subject = str(entry.get("subject") or "")
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(ScenarioProblem(loc, f"malformed remote wire: {exc}"))
            continue
        parts = subject.split(".")
        if len(parts) != 5 or parts[:2] != ["flux", "msg"] or parts[3:] != [src.gear, src.port]:
            problems.append(ScenarioProblem(loc, f"remote wire subject {subject!r} does not name its source {src}"))
            continue
        local = dst if direction == "in" else src
        spec = scenario.gear(local.gear)
        if direction not in ("in", "out") or spec is None:
            problems.append(ScenarioProblem(loc, f"remote wire end {local} is not a gear of rack {rack}"))
            continue
        src = Endpoint(parts[2], src.gear, src.port)
        dst = Endpoint(rack if direction == "in" else dst.rack, dst.gear, dst.port)
        scenario.wires.append(WireSpec(src=src, dst=dst, lane="guaranteed"))
    if problems:
        raise ScenarioError(problems, source)
    return scenario


class _Outbound(OutboundTarget):
    """The target for one subject: `put` appends to the lane WAL and returns when durable
    (durable in the lane WAL counts as delivered for a drain: the publisher ships it later)."""

    async def put(self, msg: FluxMsg) -> None:
        await self.bus.append(self.subject, msg)


class _Delivery:
    """One JetStream message handed to one or more inputs; acked when all have processed it."""

    __slots__ = ("js_msg", "key", "remaining", "processed")

    def __init__(self, js_msg, key: str, remaining: int):
        self.js_msg = js_msg
        self.key = key
        self.remaining = remaining
        self.processed = False


class _Inbound:
    """The source feeding one input port from one subject, through a bounded ordered queue."""

    def __init__(self, bus: "JetStreamBus", subject: str, consumer: str, gear, port: str):
        self.bus = bus
        self.subject = subject
        self.consumer = consumer
        self.gear = gear
        self.port = port
        self.key = ("bus-in", consumer)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, bus.inbound_capacity))
        self.task: asyncio.Task | None = None
        self.processed = 0
        self.closed = False

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(
                self._consume(), name=f"bus-in:{self.gear.name}.{self.port}")
        self.bus._register(self)

    async def put(self, msg: FluxMsg, delivery: "_Delivery") -> None:
        """Queue one message (waits while the queue is full: the pull loop's backpressure)."""
        if self.closed:
            self.bus._give_back(delivery)
            return
        await self.queue.put((msg, delivery))
        if self.closed:  # closed while this put waited: nobody will take it
            self._give_back_queued()

    async def _consume(self) -> None:
        q = self.queue
        gear, port, bus = self.gear, self.port, self.bus
        while True:
            msg, delivery = await q.get()
            finished = False
            try:
                if gear.state == "stopped":  # the kill switch stopped it: JetStream keeps the rest
                    continue
                await deliver(gear, port, msg)
                self.processed += 1
                finished = True
                await bus._done(delivery)
            finally:
                q.task_done()
                if not finished:  # stopped gear, or cancelled mid-processing: let JetStream redeliver
                    bus._give_back(delivery)

    def depth(self) -> int:
        return self.queue.qsize()

    async def join(self) -> None:
        # A drain (shutdown, or this source retiring in a reload): no new fetches meanwhile,
        # or a busy stream would keep the queue from ever emptying.
        self.bus._holds += 1
        try:
            await self.queue.join()
        finally:
            self.bus._holds -= 1
            self.bus._routes_changed.set()

    def close(self) -> None:
        self.closed = True
        self.bus._unregister(self)
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self._give_back_queued()

    def _give_back_queued(self) -> None:
        # What never reached the gear goes back to JetStream for the next incarnation.
        while not self.queue.empty():
            _msg, delivery = self.queue.get_nowait()
            self.queue.task_done()
            self.bus._give_back(delivery)


class JetStreamBus:
    """The guaranteed lane of a joined Rack (see the module docstring). `start()` once the
    loop runs, `close()` after the runtime has stopped and before the agent closes its bus
    connection."""

    def __init__(
        self,
        agent,
        wal,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT_S,
        fetch_batch: int = DEFAULT_FETCH_BATCH,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S,
        inbound_capacity: int = DEFAULT_INBOUND_CAPACITY,
        dedup_capacity: int = DEFAULT_DEDUP_CAPACITY,
        max_backlog_bytes: int | None = DEFAULT_MAX_BACKLOG_BYTES,
        send_timeout: float = DEFAULT_SEND_TIMEOUT_S,
        retry_wait: float = DEFAULT_RETRY_WAIT_S,
        idle_wait: float = DEFAULT_IDLE_WAIT_S,
        stale_after_deliveries: int = STALE_AFTER_DELIVERIES,
        stale_nak_delay: float = STALE_NAK_DELAY_S,
    ):
        if max_inflight < 1 or fetch_batch < 1 or dedup_capacity < 1:
            raise ValueError("max_inflight, fetch_batch and dedup_capacity must be at least 1")
        self.agent = agent
        self.wal = wal
        self.max_inflight = max_inflight
        self.publish_timeout = publish_timeout
        self.fetch_batch = fetch_batch
        self.fetch_timeout = fetch_timeout
        self.inbound_capacity = inbound_capacity
        self.dedup_capacity = dedup_capacity
        self.max_backlog_bytes = max_backlog_bytes
        self.send_timeout = send_timeout
        self.retry_wait = retry_wait
        self.idle_wait = idle_wait
        self.stale_after_deliveries = stale_after_deliveries
        self.stale_nak_delay = stale_nak_delay
        self.m = dict.fromkeys((
            "appended", "published", "publish_failures", "foreign_dropped", "undecodable_records",
            "lane_full", "backlog_waits", "fetched", "delivered", "acked", "ack_failures", "duplicates",
            "redelivered_in_progress", "unrouted_naks", "held_naks", "stale_acked", "undecodable_msgs", "given_back",
            "fetch_errors"), 0)  # fmt: skip
        self.last_error = ""
        self._routes: dict[str, dict[str, _Inbound]] = {}  # subject -> consumer name -> source
        self._routes_changed = asyncio.Event()
        self._holds = 0  # sources draining: fetching pauses
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._working: dict[str, _Delivery] = {}
        self._inflight: deque = deque()
        self._next_seq = 0
        self._skip: set[int] = set()
        wm = wal.metrics()
        self._backlog_bytes = int(wm.get("size_bytes") or 0) if wm.get("unacked_records") else 0
        self._room = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()

    # -- the runtime's contract ------------------------------------------------------------

    def outbound(self, subject: str) -> _Outbound:
        return _Outbound(self, subject)

    def inbound(self, subject: str, consumer: str, gear, port: str) -> _Inbound:
        return _Inbound(self, subject, consumer, gear, port)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._next_seq = self.wal.cursor + 1
        self._tasks = [loop.create_task(self._publisher(), name="lane-publisher"),
                       loop.create_task(self._puller(), name="lane-puller")]

    async def close(self) -> None:
        """Stop fetching (the current fetch finishes and is routed or given back), give back
        what inputs still hold, flush acks, stop the publisher; the lane WAL stays open (its
        owner closes it). Unpublished records stay in the WAL for the next start."""
        self._closing = True
        self._routes_changed.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.fetch_timeout + CLOSE_WAIT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for routes in list(self._routes.values()):
            for source in list(routes.values()):
                source.close()
        if self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)
        nc = self.agent.nc
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.flush(), 1.0)
            except Exception:
                pass

    @contextlib.asynccontextmanager
    async def hold(self):
        """No fetching while inside (a reload): a new input and the old one it replaces are
        both registered until the swap retires the old one, and a message fetched meanwhile
        would reach both. Messages wait in JetStream; what inputs already hold is processed."""
        self._holds += 1
        try:
            yield self
        finally:
            self._holds -= 1
            self._routes_changed.set()

    def metrics(self) -> dict:
        m = dict(self.m)
        m.update(
            backlog_records=max(0, self.wal.committed_seq - self.wal.cursor),
            backlog_bytes=self._backlog_bytes,
            inflight=len(self._inflight),
            inputs=sum(len(r) for r in self._routes.values()),
            working=len(self._working),
        )
        return m

    # -- outbound ----------------------------------------------------------------------------

    async def append(self, subject: str, msg: FluxMsg) -> None:
        """Encode and append to the lane WAL; return once durable (LaneFull past the backlog cap)."""
        cap = self.max_backlog_bytes
        if cap is not None and self._backlog_bytes >= cap:
            await self._wait_room(subject, cap)
        record = cbor2.dumps([subject, dedup_id(msg, subject), msg.to_cbor()])
        self._backlog_bytes += len(record)
        await self.wal.append(record)
        self.m["appended"] += 1

    async def _wait_room(self, subject: str, cap: int) -> None:
        self.m["backlog_waits"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.send_timeout
        while self._backlog_bytes >= cap:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.m["lane_full"] += 1
                raise LaneFull(f"guaranteed lane {subject}: {self._backlog_bytes} bytes wait for the Snake "
                               f"(cap {cap}); nothing published for {self.send_timeout:g}s")
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _can_ship(self) -> bool:
        a = self.agent
        return (a.connected.is_set() and a.js is not None and a.passport is not None
                and a.passport.status in SHIPPABLE_STATUSES)

    async def _publisher(self) -> None:
        wal = self.wal
        while not self._closing:
            try:
                if not self._can_ship():
                    if self._inflight:
                        await self._settle_all()
                    else:
                        await asyncio.sleep(self.idle_wait)
                    continue
                # Read in chunks (a quarter of the window at least): one executor round trip
                # per record would cost more than the publish itself.
                room = self.max_inflight - len(self._inflight)
                if (room >= self.max_inflight // 4 or not self._inflight) and wal.committed_seq >= self._next_seq:
                    records = await wal.read_from(self._next_seq, room)
                    if records:
                        self._issue(records)
                        continue
                if self._inflight:
                    await self._settle_oldest()
                else:
                    await wal.wait_committed(self._next_seq - 1, timeout=self.idle_wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a failed WAL read: never let the lane die
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("guaranteed-lane publisher")
                await asyncio.sleep(self.retry_wait)
        if self._inflight:
            await self._settle_all()

    def _issue(self, records) -> None:
        js = self.agent.js
        rack = self.agent.rack_name
        for r in records:
            self._next_seq = r.seq + 1
            if r.seq in self._skip:  # already stored before an earlier failure in its window
                self._skip.discard(r.seq)
                continue
            try:
                subject, msg_id, body = cbor2.loads(r.payload)
            except Exception:
                self.m["undecodable_records"] += 1
                self._acked(r.seq, len(r.payload))
                continue
            if S.rack_of_subject(subject) != rack:
                self.m["foreign_dropped"] += 1
                log.warning("guaranteed lane: %s is not a subject of rack %s; dropped", subject, rack)
                self._acked(r.seq, len(r.payload))
                continue
            fut = asyncio.ensure_future(js.publish(subject, body, timeout=self.publish_timeout,
                                                   headers={MSG_ID_HEADER: msg_id}))
            self._inflight.append((r.seq, len(r.payload), fut))

    def _acked(self, seq: int, size: int) -> None:
        self.wal.ack(seq)
        self._backlog_bytes = max(0, self._backlog_bytes - size)
        self._room.set()

    async def _settle_oldest(self) -> None:
        seq, size, fut = self._inflight[0]
        while not fut.done():
            await asyncio.wait({fut}, timeout=self.idle_wait)
            if not fut.done() and not self._can_ship():
                # Connection lost: its acks will never come; do not wait out publish_timeout.
                await self._failed(FluxError("disconnected from the Snake with publishes in flight"), abandon=True)
                return
        if fut.cancelled() or fut.exception() is not None:
            await self._failed(fut.exception() or FluxError("publish cancelled"))
            return
        self._inflight.popleft()
        self.m["published"] += 1
        self._acked(seq, size)

    async def _settle_all(self) -> None:
        while self._inflight:
            await self._settle_oldest()

    async def _failed(self, exc: BaseException, abandon: bool = False) -> None:
        """A publish in the window failed: let the rest finish (or, `abandon`, cancel what has
        no answer yet), keep what was stored, and restart from the first record that was not.
        Records re-sent that JetStream already had are dropped by its duplicate window."""
        window, self._inflight = list(self._inflight), deque()
        futures = [f for _s, _z, f in window]
        if abandon:
            for f in futures:
                f.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
        first_failed = None
        for seq, size, fut in window:
            if not fut.cancelled() and fut.exception() is None:
                self.m["published"] += 1
                self._acked(seq, size)
                if first_failed is not None:
                    self._skip.add(seq)
            elif first_failed is None:
                first_failed = seq
        self.m["publish_failures"] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        log.debug("guaranteed lane: publish failed (%s); retrying from record %s", self.last_error, first_failed)
        if first_failed is not None:
            self._next_seq = first_failed
        await asyncio.sleep(self.retry_wait)

    # -- inbound -----------------------------------------------------------------------------

    def _register(self, source: _Inbound) -> None:
        # Keyed by consumer name: a rebuilt gear's new source replaces the old one at once,
        # while the old one finishes its queue (a reload's retire phase).
        self._routes.setdefault(source.subject, {})[source.consumer] = source
        self._routes_changed.set()

    def _unregister(self, source: _Inbound) -> None:
        routes = self._routes.get(source.subject)
        if routes is not None and routes.get(source.consumer) is source:
            del routes[source.consumer]
            if not routes:
                del self._routes[source.subject]

    def _can_pull(self) -> bool:
        return self._can_ship() and bool(self.agent.rack_name)

    async def _puller(self) -> None:
        psub = bound = None
        while not self._closing:
            if not self._routes or self._holds or not self._live():
                self._routes_changed.clear()
                try:
                    await asyncio.wait_for(self._routes_changed.wait(), self.idle_wait * 4)
                except asyncio.TimeoutError:
                    pass
                continue
            if not self._can_pull():
                await asyncio.sleep(self.idle_wait)
                continue
            agent = self.agent
            want = (agent.nc, S.rack_consumer(agent.rack_name))
            try:
                if psub is None or bound != want:
                    psub = await agent.js.pull_subscribe_bind(consumer=want[1], stream=S.STREAM_MSG)
                    bound = want
                msgs = await psub.fetch(self.fetch_batch, timeout=self.fetch_timeout)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:  # nothing to fetch (nats TimeoutError derives from it)
                continue
            except Exception as exc:
                self.m["fetch_errors"] += 1
                text = f"{type(exc).__name__}: {exc}"[:500]
                if text != self.last_error:
                    log.warning("guaranteed lane: fetch from %s failed: %s", bound[1] if bound else "?", text)
                self.last_error = text
                if agent.nc is None or agent.nc.is_closed:
                    psub = bound = None
                await asyncio.sleep(self.retry_wait)
                continue
            self.m["fetched"] += len(msgs)
            for m in msgs:
                await self._route(m)

    def _live(self) -> bool:
        """Some input's gear still runs (a gear stopped by the kill switch takes nothing)."""
        return any(s.gear.state != "stopped" for routes in self._routes.values() for s in routes.values())

    async def _route(self, js_msg) -> None:
        headers = js_msg.headers or {}
        key = headers.get(MSG_ID_HEADER) or f"{js_msg.subject}:{js_msg.reply}"
        if key in self._seen:
            self.m["duplicates"] += 1
            await self._ack(js_msg)
            return
        working = self._working.get(key)
        if working is not None:  # redelivered while still queued: ack the newest delivery later
            self.m["redelivered_in_progress"] += 1
            working.js_msg = js_msg
            return
        routes = self._routes.get(js_msg.subject)
        if not routes or self._closing:
            await self._unrouted(js_msg)
            return
        try:
            msg = FluxMsg.from_cbor(js_msg.data)
        except Exception as exc:
            self.m["undecodable_msgs"] += 1
            log.warning("guaranteed lane: message on %s is not a FluxMsg (%s); acknowledged and dropped",
                        js_msg.subject, exc)
            await self._ack(js_msg)
            return
        sources = [s for s in routes.values() if s.gear.state != "stopped"]
        if not sources:  # every input here is killed: hold the message in JetStream
            self.m["held_naks"] += 1
            try:
                await js_msg.nak(delay=self.stale_nak_delay)
            except Exception:
                self.m["ack_failures"] += 1
            return
        delivery = _Delivery(js_msg, key, len(sources))
        self._working[key] = delivery
        for i, source in enumerate(sources):
            await source.put(msg if i == 0 else msg.copy(), delivery)

    async def _unrouted(self, js_msg) -> None:
        try:
            delivered = js_msg.metadata.num_delivered
        except Exception:
            delivered = 1
        closing = self._closing or not self._routes
        if delivered >= self.stale_after_deliveries and not closing:
            self.m["stale_acked"] += 1
            log.warning("guaranteed lane: no input on this rack for %s (stale wiring); message acknowledged",
                        js_msg.subject)
            await self._ack(js_msg)
            return
        self.m["unrouted_naks"] += 1
        try:
            # No input at all: the Rack is stopping, and fetching stops with the inputs, so
            # NAK for an immediate redelivery (the next incarnation gets it first, in order).
            # Inputs but none for this subject: a reload may be wiring it; do not spin.
            await js_msg.nak(delay=None if closing else self.stale_nak_delay)
        except Exception:
            self.m["ack_failures"] += 1

    async def _done(self, delivery: _Delivery) -> None:
        delivery.processed = True
        delivery.remaining -= 1
        if delivery.remaining:
            return
        await self._finish(delivery)

    async def _finish(self, delivery: _Delivery) -> None:
        self.m["delivered"] += 1
        self._working.pop(delivery.key, None)
        seen = self._seen
        seen[delivery.key] = None
        if len(seen) > self.dedup_capacity:
            seen.popitem(last=False)
        await self._ack(delivery.js_msg)

    def _give_back(self, delivery: _Delivery) -> None:
        """An input closed before processing it: NAK so JetStream redelivers, unless another
        input already processed it (then redelivery would double it there: ack instead)."""
        delivery.remaining -= 1
        if delivery.remaining:
            return
        if delivery.processed:
            self._spawn(self._finish(delivery))
            return
        self._working.pop(delivery.key, None)
        self.m["given_back"] += 1
        self._spawn(self._nak_quietly(delivery.js_msg))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._bg.discard)

    async def _nak_quietly(self, js_msg) -> None:
        try:
            await js_msg.nak()
        except Exception:
            self.m["ack_failures"] += 1

    async def _ack(self, js_msg) -> None:
        try:
            await js_msg.ack()
            self.m["acked"] += 1
        except Exception as exc:  # connection gone: JetStream redelivers, the LRU masks it
            self.m["ack_failures"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("guaranteed lane: ack failed: %s", exc)

