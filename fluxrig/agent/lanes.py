"""JetStreamBus: the guaranteed lane over the Snake (JetStream), Rack side.

Implements the runtime's bus contract (fluxrig/runtime/bus.py) for a Rack joined to a Mixer,
over a `SnakeSession` (fluxrig/agent/session.py) and nothing else.

Outbound (`outbound(subject).put(msg)`). The message is CBOR-encoded and appended to the
Rack's *lane WAL* (an AsyncWal at `<store_dir>/lanes`, separate from the telemetry WAL;
fsync before acknowledging unless `store.wal_fsync = never`, see `open_lane_wal`) as the
record `[subject, dedup id, msg CBOR]`; `put` returns once the record is durable per that
policy. That wait is the guaranteed lane's backpressure: an emitter never runs ahead of the
disk. The pump (fluxrig/agent/publisher.py, `WalPublisher` with `LaneCodec`) ships the
records in WAL order, many per JetStream message (fluxrig/wire/batch.py: one subject per
batch, order kept per subject), pipelined within an adaptive window, each batch with a
`Nats-Msg-Id` derived from its records; a record is acknowledged in the WAL only after the
PubAck of its batch (on disk at the Snake), so the WAL may then delete it. While the session
is not usable (Snake unreachable, passport not allowing traffic) records simply wait in the
WAL (offline operation) and flow when it returns; a failed publish restarts from the first
unacknowledged record. The backlog (unacknowledged bytes) is capped at `max_backlog_bytes`:
past it `put` waits up to `send_timeout` for the pump, then raises LaneFull (the gear's error
convention), rather than silently dropping the oldest records as the telemetry WAL does.
Records for a subject of another Rack were queued under this Rack's former name (it was
renamed): they are published on the same gear and port under the current name
(`flux.msg.<new>.<gear>.<port>`, the subject the receivers' consumers filter after the
rename; record ids kept, so a receiver that had some still masks them), counted in
`migrated` and logged once per former subject. A record that does not decode, or whose
subject is not a `flux.msg.<rack>.<gear>.<port>`, is parked (a durable copy in
`<store_dir>/lanes/parked/`, `fluxrig inspect-wal --parked`), logged at ERROR and counted
(`undecodable_records`, `foreign_dropped`) before the WAL lets it go.

Inbound (`inbound(subject, consumer, gear, port)`). One pull loop per Rack fetches from its
durable consumer `in-<rack>` on stream `flux-msg` (created by the Mixer with the source
subjects of every wire into this Rack as its filter; rebound at every new session
generation). Each JetStream message is a batch (or, from an older Rack, one FluxMsg); each
record is routed by subject to every registered input (gear, port) through that input's
bounded queue (`inbound_capacity` records; a full queue stops the fetching: backpressure to
JetStream, which holds the rest), processed in order by one task per input. A JetStream
message is acknowledged only when every record in it was processed by every input it went
to. Delivery is at least once from JetStream; a bounded LRU of recently processed record ids
(`dedup_capacity`) plus the records being processed mask redeliveries, so a gear sees each
record once, even when a batch cut by a sender's crash arrives again with other boundaries
(a redelivered record still being processed makes the new message wait for it). A message
on a subject with no registered input is NAKed with a delay (`stale_nak_delay`: a reload may
be registering it) and, after `stale_after_deliveries` deliveries, acknowledged and counted
in `stale_acked` (stale wiring at the Mixer). Fetching pauses while inputs drain (`join`)
and during a reload (`hold()`, used by the runtime around its swap), so a message never
reaches both an input and its replacement, and while every input's gear is stopped (kill
switch): a killed gear's messages wait in JetStream (what its queue held is given back: the
message is NAKed once its other records are settled, and what was processed stays masked)
until it is revived; a killed gear among live ones misses what arrives meanwhile, as on a
hot lane.

Group inputs (issue 17 item 2). An input of a gear deployed to one of this Rack's groups,
fed from outside the group, is registered with `shared="grp-<group>"`: it is fed by a pull
loop of its own on that durable consumer, which every member of the group pulls from, so
JetStream hands each message to exactly one member, and redelivers it (after the consumer's
ack wait, with its back-off) to whichever member pulls next when the one holding it died. A
message delivered `group_max_deliveries` times is parked as poison (ERROR, `poison_parked`)
and acknowledged: never retried again. Routing keeps the two apart: a subject wired both to
a group input and to one of this Rack's own inputs reaches each from its own consumer only.

Order. Per input, records are processed in stream order. A Rack that stops fetching (a stop,
every input gone or killed) first gives back, NAKed in stream order, what it fetched and did
not route and what the Snake still delivers to the pull request of its last fetch (which
outlives the fetch call until it expires, lane_inbound.Pull): redelivered first, it keeps the
order across a graceful restart. During a short hold (a reload) fetched messages wait for the
new inputs instead. What an earlier connection left unsettled (a receiving Rack killed, a lost
link) JetStream redelivers only after the consumer's ack_wait, after newer messages: a WARNING
after a bind says how many (what was given back, redelivered first, is not counted:
lane_inbound.OrderGuard; metric `unsettled_at_bind`), a message routed behind a newer one of its subject is counted
(`out_of_order`) and logged at ERROR. Publishes are pipelined, so after a failure a batch
whose publish was lost can be stored after later batches of the same window: order across a
Snake outage is best effort, loss and duplication are not.

Limits of "once". A Rack killed (SIGKILL, power) after a PubAck but before its WAL cursor was
persisted (at most `cursor_sync_ms`, 200 ms) re-sends those records on restart: JetStream
drops an identical batch within its duplicate window (flux-msg: 120 s), the receiving Rack's
LRU drops the records of a batch cut differently while it remembers them. A receiving Rack
killed after its gear processed a record but before the ack gets it again (at least once). A
graceful stop acks what was processed and NAKs the rest, including what it was sent last.

Nothing here decides wiring: the runtime asks for targets and sources (graph.py) and the
Mixer keeps the consumer's filter in step with the active scenario (fluxrig_mixer.lanes).
Raises: LaneFull from `put` (backlog cap), WalFailed/WalClosed from the lane WAL, WalOpenFailed
while the lane WAL could not be opened (the sending half: fluxrig/agent/lane_outbound.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from ..aiotools import cancel_all_and_wait, cancel_and_wait
from ..errors import ScenarioError, ScenarioProblem
from ..msg import FluxMsg
from ..runtime.states import GearState
from ..scenario import build_scenario
from ..scenario.model import Endpoint, WireSpec
from ..wal.errors import WalOpenFailed
from ..wire import subjects as S
from ..wire.batch import (
    LaneBatchError,
    decode_lane_batch,
    is_lane_batch,
)
from .lane_codec import LANE_LIMITS, LANE_PACING, LANE_WAL_DIR, MSG_ID_HEADER, LaneCodec, open_lane_wal
from .lane_inbound import Delivery, Inbound, OrderGuard, Pull, Record, park_received
from .lane_outbound import _PUMP_METRICS, WAL_REOPEN_S, SendingSide, _Outbound
from .publisher import WalPublisher
from .pump import DropReason, Pacing, PumpLimits
from .session import SessionState, SnakeSession

__all__ = [
    "JetStreamBus",
    "LaneCodec",
    "open_lane_wal",
    "scenario_from_projection",
    "LANE_WAL_DIR",
    "LANE_LIMITS",
    "LANE_PACING",
    "MSG_ID_HEADER",
]

log = logging.getLogger("fluxrig.agent.lanes")

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
#: Deliveries after which a group consumer's message is parked as poison (issue 17); the
#: Mixer's group consumer allows one more (fluxrig_mixer.groups), so the last one reaches a Rack.
GROUP_MAX_DELIVERIES = 5
CLOSE_WAIT_S = 5.0  # beyond the fetch: giving back what the last pull request delivers, the UNSUB's round trip
HOLD_GIVE_BACK_S = 5.0  # a hold (reload, drain) longer than this gives the fetched messages back


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


class JetStreamBus(SendingSide):
    """The guaranteed lane of a joined Rack (see the module docstring). `start()` once the
    loop runs, `close()` after the runtime has stopped and before the session closes."""

    def __init__(
        self,
        session: SnakeSession,
        wal,
        *,
        limits: PumpLimits = LANE_LIMITS,
        pacing: Pacing = LANE_PACING,
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
        group_max_deliveries: int = GROUP_MAX_DELIVERIES,
        hold_give_back: float = HOLD_GIVE_BACK_S,
        open_wal=None,
        wal_reopen_interval: float = WAL_REOPEN_S,
    ):
        if fetch_batch < 1 or dedup_capacity < 1:
            raise ValueError("fetch_batch and dedup_capacity must be at least 1")
        self.session = session
        self.wal = wal
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
        self.hold_give_back = hold_give_back
        self._pump = dict(name="lane-publisher", limits=limits, pacing=pacing, publish_timeout=publish_timeout,
                          retry_wait=retry_wait, idle_wait=idle_wait)  # fmt: skip
        if wal is None and open_wal is None:
            raise ValueError("JetStreamBus needs a lane WAL or open_wal to open it")
        self._open_wal = open_wal
        self.wal_reopen_interval = wal_reopen_interval
        self.wal_open_error: WalOpenFailed | None = None  # the lane WAL could not be opened (yet)
        self._wal_ready = asyncio.Event()
        self._reopen_task: asyncio.Task | None = None
        self.publisher: WalPublisher | None = None
        self._backlog_base = 0
        self.m = dict.fromkeys((
            "appended", "lane_full", "backlog_waits", "fetched", "fetched_records", "delivered", "acked",
            "acked_msgs", "ack_failures", "duplicates", "redelivered_in_progress", "unrouted_naks", "held_naks",
            "stale_acked", "undecodable_msgs", "given_back", "held_back", "fetch_errors", "storage_waits",
            "storage_refused", "parked", "park_failures", "poison_parked", "given_back_pending",
            "out_of_order"), 0)  # fmt: skip
        self.last_error = ""
        self._routes: dict[str, dict[str, Inbound]] = {}  # subject -> consumer name -> source
        self._routes_changed = asyncio.Event()
        self._holds = 0  # sources draining or a reload: fetching pauses
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._working: dict[str, Record] = {}
        self._deliveries: dict[str, Delivery] = {}
        self.order = OrderGuard()  # the Rack's own consumer (a group's is shared: no order across members)
        self._appended_bytes = 0
        self._closing = False
        self._puller_task: asyncio.Task | None = None
        self._shared_pullers: dict[str, asyncio.Task] = {}  # group consumer -> its pull loop
        self.group_max_deliveries = group_max_deliveries
        self._bg: set[asyncio.Task] = set()
        if wal is not None:
            self._attach(wal)

    # -- the runtime's contract ------------------------------------------------------------

    def outbound(self, subject: str) -> _Outbound:
        return _Outbound(self, subject)

    def inbound(self, subject: str, consumer: str, gear, port: str, shared: str | None = None) -> Inbound:
        """`shared`: the durable group consumer (`grp-<group>`) this input is fed from, one
        consumer shared by every member of the group (issue 17: see _shared_puller)."""
        return Inbound(self, subject, consumer, gear, port, shared)

    # -- group relay (issue 17 item 3): core NATS between members, through the session --------

    async def relay_publish(self, subject: str, payload: bytes) -> bool:
        return await self.session.relay_publish(subject, payload)

    def relay_subscribe(self, subject: str, cb) -> None:
        self.session.relay_subscribe(subject, cb)

    def relay_unsubscribe(self, subject: str) -> None:
        self.session.relay_unsubscribe(subject)

    @contextlib.asynccontextmanager
    async def hold(self):
        """No fetching while inside (a reload, a drain): a new input and the old one it
        replaces are both registered until the swap retires the old one, and a message
        fetched meanwhile would reach both. Messages wait in JetStream; what inputs already
        hold is processed."""
        self._holds += 1
        try:
            yield self
        finally:
            self._holds -= 1
            self._routes_changed.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._puller_task is not None:
            return
        if self.publisher is not None:
            self.publisher.start()
        else:
            self._reopen_task = asyncio.get_running_loop().create_task(self._reopen_wal(), name="lane-wal-open")
        self._puller_task = asyncio.get_running_loop().create_task(self._puller(), name="lane-puller")

    async def close(self) -> None:
        """Stop fetching (the current fetch finishes and is routed or given back), give back
        what inputs still hold, flush acks, stop the pump; the lane WAL stays open (its owner
        closes it). Unpublished records stay in the WAL for the next start."""
        self._closing = True
        self._routes_changed.set()
        task, self._puller_task = self._puller_task, None
        tasks = [t for t in (task, *self._shared_pullers.values()) if t is not None]
        self._shared_pullers.clear()
        if tasks:  # a fetch in progress ends by itself within its timeout; past that, cancelled
            await asyncio.wait(set(tasks), timeout=self.fetch_timeout + CLOSE_WAIT_S)
            await cancel_all_and_wait(tasks)
        for routes in list(self._routes.values()):
            for source in list(routes.values()):
                source.close()
        if self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)
        await cancel_and_wait(self._reopen_task)
        if self.publisher is not None:
            await self.publisher.close()
        await self.session.flush(1.0)

    def metrics(self) -> dict:
        m = dict(self.m)
        m["storage_failed"] = self.wal_open_error is not None
        m["unsettled_at_bind"] = self.order.unsettled_at_bind
        if self.publisher is None:  # the lane WAL is not open: nothing to ship
            m.update(dict.fromkeys(_PUMP_METRICS, 0), backlog_bytes=0, inputs=sum(len(r) for r in self._routes.values()),
                     working=len(self._working), last_error=self.last_error or str(self.wal_open_error or ""))  # fmt: skip
            return m
        p = self.publisher.metrics()
        m.update(
            published=p["published"],
            batches_published=p["batches"],
            records_per_batch=p["records_per_batch"],
            publish_failures=p["publish_failures"],
            foreign_dropped=p["dropped"][DropReason.FOREIGN],
            migrated=self.publisher.codec.migrated,
            parked_failures=self.publisher.park_failures,
            quota_rejections=p["quota_rejections"],
            quota_full=p["quota_full"],
            undecodable_records=p["dropped"][DropReason.UNDECODABLE],
            window=p["window"],
            rtt_ms=p["rtt_ms"],
            backlog_records=p["backlog_records"],
            backlog_bytes=self._backlog_bytes(),
            inflight=p["inflight_records"],
            inflight_batches=p["inflight_batches"],
            inputs=sum(len(r) for r in self._routes.values()),
            working=len(self._working),
            last_error=self.last_error or self.publisher.last_error,
        )
        return m

    # -- outbound ----------------------------------------------------------------------------

    # -- inbound: fetching -------------------------------------------------------------------

    def _register(self, source: Inbound) -> None:
        # Keyed by consumer name: a rebuilt gear's new source replaces the old one at once,
        # while the old one finishes its queue (a reload's retire phase).
        self._routes.setdefault(source.subject, {})[source.consumer] = source
        self._routes_changed.set()
        if source.shared and source.shared not in self._shared_pullers and not self._closing:
            self._shared_pullers[source.shared] = asyncio.get_running_loop().create_task(
                self._puller(source.shared), name=f"lane-puller:{source.shared}"
            )

    def _unregister(self, source: Inbound) -> None:
        routes = self._routes.get(source.subject)
        if routes is not None and routes.get(source.consumer) is source:
            del routes[source.consumer]
            if not routes:
                del self._routes[source.subject]

    def _live(self, shared: str | None = None) -> bool:
        """Some input's gear fed from this consumer (`shared`: a group's, None: the Rack's own)
        still runs (a gear stopped by the kill switch takes nothing)."""
        return any(
            s.gear.state != GearState.STOPPED and s.shared == shared
            for routes in self._routes.values()
            for s in routes.values()
        )

    async def _puller(self, shared: str | None = None) -> None:
        """The pull loop of one durable consumer: the Rack's own `in-<rack>`, or (`shared`) a
        group's `grp-<group>`, from which every member of the group pulls: JetStream hands each
        message to one of them, and redelivers it to any after `ack_wait` when the one that had
        it died (issue 17 item 2)."""
        session = self.session
        pull: Pull | None = None
        bound = None
        carry: list = []  # fetched, not routed yet: a hold began while routing them
        held_since = None
        loop = asyncio.get_running_loop()
        while not self._closing:
            idle = not self._routes or not self._live(shared)
            if self._holds and not idle:
                # A reload or a drain: keep what was fetched and what the Snake still sends
                # (the oldest undelivered messages) for the inputs after it, unless it lasts.
                held_since = held_since or loop.time()
                if loop.time() - held_since > self.hold_give_back:
                    await self._give_back(pull, carry)
            elif idle:
                # Nothing takes messages for a while (no inputs, every gear killed): give
                # back what was fetched, in stream order, so JetStream holds it, not this Rack.
                await self._give_back(pull, carry)
            if self._holds or idle:
                self._routes_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._routes_changed.wait(), self.idle_wait * 4)
                continue
            held_since = None
            rack = session.rack_name
            if session.state is not SessionState.USABLE or not rack:
                await session.wait_usable(self.idle_wait)
                continue
            want = (session.generation, shared or S.rack_consumer(rack))
            if carry:
                msgs, carry = carry, []
            else:
                try:
                    if pull is None or bound != want:
                        carry.clear()  # fetched over an older connection: its deliveries are void
                        pull = Pull(await session.pull_subscribe(want[1], S.STREAM_MSG))
                        bound = want
                        if shared is None:
                            self.order.bind(await pull.info(), len(self._deliveries), want[1])
                    msgs = await pull.fetch(self.fetch_batch, self.fetch_timeout)
                except asyncio.CancelledError:
                    raise
                except TimeoutError:  # nothing to fetch (nats' TimeoutError derives from it)
                    if shared is None:
                        self.order.caught_up()  # nothing was redelivered promptly: the rest is late
                    continue
                except Exception as exc:
                    self.m["fetch_errors"] += 1
                    text = f"{type(exc).__name__}: {exc}"[:500]
                    if text != self.last_error:
                        log.warning("guaranteed lane: fetch from %s failed: %s", want[1], text)
                    self.last_error = text
                    pull = bound = None
                    await asyncio.sleep(self.retry_wait)
                    continue
                self.m["fetched"] += len(msgs)
            for i, m in enumerate(msgs):
                if self._holds or self._closing or not self._live(shared):
                    # A drain or a reload began while this fetch was being routed: its inputs
                    # may be joined already, and a gear being stopped must get nothing more.
                    # The rest waits for the inputs after the hold, or goes back in stream
                    # order at once (every gear stopped: a stop, the kill switch). Routed, it
                    # would be NAKed with a delay, and newer messages fetched meanwhile by the
                    # next incarnation or the revived gear would overtake it.
                    self.m["held_back"] += len(msgs) - i
                    carry = msgs[i:]
                    break
                await self._route(m, shared)
        await self._give_back(pull, carry)
        if pull is not None:
            self.m["given_back_pending"] += await pull.close(self._nak)

    async def _give_back(self, pull: Pull | None, carry: list) -> None:
        """NAK, in stream order, what was fetched but not routed and what the Snake delivered
        that no fetch returned. A fetch returns early while its pull request lives on at the
        Snake until it has its batch or expires; a message delivered meanwhile waits in the
        subscription. Left there when the Rack stops, it is nobody's: JetStream redelivers it
        only after the consumer's ack_wait (30 s), behind newer messages, which broke the
        order across a receiver's restart. NAKed, it is redelivered first."""
        rest, carry[:] = list(carry), []
        for m in rest:
            await self._nak(m, None)
        if pull is not None:
            self.m["given_back_pending"] += await pull.give_back(self._nak)

    # -- inbound: routing and settling -------------------------------------------------------

    def _records_of(self, js_msg, key: str) -> list[tuple[str, bytes]] | None | bool:
        data = js_msg.data
        if not is_lane_batch(data):  # one FluxMsg, as an older Rack sends: its message id is its record id
            return [(key, data)]
        try:
            return decode_lane_batch(data)
        except LaneBatchError as exc:
            self.m["undecodable_msgs"] += 1
            # None: parked, ack it; False: not parked, leave it in JetStream (NAK with a delay)
            return None if self._park_inbound(js_msg, data, "undecodable-batch", f"does not decode ({exc})") else False

    def _park_inbound(self, js_msg, data: bytes, reason: str, why: str, record: int | None = None) -> str:
        """A durable copy (lane_inbound.park_received) before acking a message this Rack
        cannot use, or one record of it (`record`: its index in the batch); "" when it could
        not be written (then not acked: JetStream keeps it)."""
        directory = self.wal.wal.directory if self.wal is not None else None
        where = park_received(directory, js_msg, data, reason, why, record)
        self.m["parked" if where else "park_failures"] += 1
        return where

    async def _route(self, js_msg, shared: str | None = None) -> None:
        if shared is not None and await self._poison(js_msg):
            return
        headers = js_msg.headers or {}
        key = headers.get(MSG_ID_HEADER) or f"{js_msg.subject}:{js_msg.reply}"
        delivery = self._deliveries.get(key)
        if delivery is not None:  # redelivered while its records are queued: ack the newest delivery
            self.m["redelivered_in_progress"] += 1
            delivery.js_msg = js_msg
            return
        if shared is None:
            self.order.arrived(js_msg)  # counts what an earlier connection left (OrderGuard)
        records = self._records_of(js_msg, key)
        if not records:
            if records is False:
                await self._nak(js_msg, self.stale_nak_delay)
            else:
                await self._ack(js_msg, 0)
            return
        self.m["fetched_records"] += len(records)
        seen, working = self._seen, self._working
        # each record with its index in the batch: a parked one is named by it (park_received)
        fresh = [(i, rid, body) for i, (rid, body) in enumerate(records) if rid not in seen]
        if not fresh:  # every record already processed: a re-send or a redelivery
            self.m["duplicates"] += len(records)
            await self._ack(js_msg, len(records))
            return
        routes = self._routes.get(js_msg.subject)
        routes = {k: s for k, s in routes.items() if s.shared == shared} if routes else routes
        if not routes or self._closing:
            await self._unrouted(js_msg)
            return
        sources = [s for s in routes.values() if s.gear.state != GearState.STOPPED]
        if not sources:  # every input here is killed: hold the message in JetStream
            self.m["held_naks"] += 1
            await self._nak(js_msg, self.stale_nak_delay)
            return
        self.m["duplicates"] += len(records) - len(fresh)
        if shared is None and not self.order.check(js_msg):
            self.m["out_of_order"] += 1
        delivery = Delivery(js_msg, key)
        delivery.records = len(records)
        self._deliveries[key] = delivery
        for index, rid, body in fresh:
            record = working.get(rid)
            if record is not None:  # in another message still being processed: wait for it
                self.m["redelivered_in_progress"] += 1
                record.waiting.append(delivery)
                delivery.remaining += 1
                continue
            try:
                msg = FluxMsg.from_cbor(body)
            except Exception as exc:
                self.m["undecodable_msgs"] += 1
                if not self._park_inbound(
                    js_msg, body, "not-a-fluxmsg", f"carries record {rid}, not a FluxMsg ({exc})", index
                ):
                    delivery.given_back = True  # not parked: NAK the message, JetStream keeps it
                continue
            record = Record(rid, len(sources), delivery)
            working[rid] = record
            delivery.remaining += 1
            for i, source in enumerate(sources):
                await source.put(msg if i == 0 else msg.copy(), record)
        self._release(delivery)  # the routing's own hold

    async def _poison(self, js_msg) -> bool:
        """A group consumer's message delivered `group_max_deliveries` times (it took a member
        down, or outlived its ack wait, that often) is parked here with an ERROR and a count
        (`poison_parked`), then acknowledged: never retried for the stream's lifetime."""
        try:
            delivered = js_msg.metadata.num_delivered
        except Exception:
            return False
        if delivered < self.group_max_deliveries:
            return False
        why = f"was delivered {delivered} times to the group (limit {self.group_max_deliveries}): poison"
        if not self._park_inbound(js_msg, js_msg.data, "poison", why):
            return False
        self.m["poison_parked"] += 1
        await self._ack(js_msg, 0)
        return True

    def _settle(self, record: Record, processed: bool) -> None:
        """One input is done with a record: processed it, or gave it back (closed, killed,
        cancelled). Once every input is done: remembered as seen if any processed it (a
        redelivery would double it there), and its messages move on."""
        if processed:
            record.processed = True
        record.remaining -= 1
        if record.remaining:
            return
        if self._working.get(record.rid) is record:
            del self._working[record.rid]
        if record.processed:
            self.m["delivered"] += 1
            seen = self._seen
            seen[record.rid] = None
            if len(seen) > self.dedup_capacity:
                seen.popitem(last=False)
        else:
            self.m["given_back"] += 1
        for delivery in record.waiting:
            if not record.processed:
                delivery.given_back = True
            self._release(delivery)

    def _release(self, delivery: Delivery) -> None:
        delivery.remaining -= 1
        if delivery.remaining:
            return
        if self._deliveries.get(delivery.key) is delivery:
            del self._deliveries[delivery.key]
        if delivery.given_back:
            self._spawn(self._nak(delivery.js_msg, None))
        else:
            self._spawn(self._ack(delivery.js_msg, delivery.records))

    async def _unrouted(self, js_msg) -> None:
        try:
            delivered = js_msg.metadata.num_delivered
        except Exception:
            delivered = 1
        closing = self._closing or not self._routes
        if delivered >= self.stale_after_deliveries and not closing:
            if self._park_inbound(js_msg, js_msg.data, "no-input", "has no input on this rack (stale wiring)"):
                self.m["stale_acked"] += 1
                await self._ack(js_msg, 0)
                return
        self.m["unrouted_naks"] += 1
        # No input at all: the Rack is stopping, and fetching stops with the inputs, so NAK
        # for an immediate redelivery (the next incarnation gets it first, in order). Inputs
        # but none for this subject: a reload may be wiring it; do not spin.
        await self._nak(js_msg, None if closing else self.stale_nak_delay)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._bg.discard)

    async def _nak(self, js_msg, delay: float | None) -> None:
        try:
            await js_msg.nak(delay=delay)
        except Exception:
            self.m["ack_failures"] += 1

    async def _ack(self, js_msg, records: int) -> None:
        try:
            await js_msg.ack()
            self.m["acked_msgs"] += 1
            self.m["acked"] += records
        except Exception as exc:  # connection gone: JetStream redelivers, the LRU masks it
            self.m["ack_failures"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("guaranteed lane: ack failed: %s", exc)
