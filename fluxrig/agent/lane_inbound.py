"""The receiving side's parts of the guaranteed lane (fluxrig/agent/lanes.py, JetStreamBus).

`Inbound` feeds one input port from one subject through a bounded ordered queue, one task per
input; `Record` and `Delivery` are the settle bookkeeping (a JetStream message is acked when
every record in it was processed by every input it went to, NAKed when one was given back);
`Pull` wraps a bound pull subscription and knows how long the pull request of its last fetch
may still deliver, so that a Rack that stops fetching gives back everything the Snake sent it
(`give_back`), in stream order. The bus owns the routing, the dedup LRU and the settling
(`_settle`, `_register`, `hold`); these classes call into it and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import TYPE_CHECKING

from ..msg import FluxMsg
from ..runtime.lane import deliver
from ..runtime.states import GearState
from ..wal.parked import park

if TYPE_CHECKING:
    from .lanes import JetStreamBus

__all__ = ["Record", "Delivery", "Inbound", "Pull", "OrderGuard", "park_received", "PULL_EXPIRY_MARGIN_S"]

log = logging.getLogger("fluxrig.agent.lanes")

PULL_EXPIRY_MARGIN_S = 0.5  # a pull request expires at the Snake up to one round trip after the fetch timed out
CLOSE_DRAIN_S = 2.0  # at most this long for the UNSUB's round trip when a subscription closes


class Record:
    """One record handed to one or more inputs; settled when each has processed it or given
    it back. `waiting` are the JetStream messages whose ack waits for it."""

    __slots__ = ("rid", "remaining", "processed", "waiting")

    def __init__(self, rid: str, remaining: int, delivery: Delivery):
        self.rid = rid
        self.remaining = remaining
        self.processed = False
        self.waiting = [delivery]


class Delivery:
    """One JetStream message; acked when every record in it is settled and processed, NAKed
    when one was given back. `remaining` starts at 1 (the routing itself) so that records
    settling while later ones are still being queued cannot ack it early."""

    __slots__ = ("js_msg", "key", "remaining", "given_back", "records")

    def __init__(self, js_msg, key: str):
        self.js_msg = js_msg
        self.key = key
        self.remaining = 1
        self.given_back = False
        self.records = 0


class Inbound:
    """The source feeding one input port from one subject, through a bounded ordered queue.
    `shared` names the group consumer it is fed from (issue 17), None for the Rack's own."""

    def __init__(self, bus: JetStreamBus, subject: str, consumer: str, gear, port: str, shared: str | None = None):
        self.bus = bus
        self.subject = subject
        self.consumer = consumer
        self.shared = shared
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
                self._consume(), name=f"bus-in:{self.gear.name}.{self.port}"
            )
        self.bus._register(self)

    async def put(self, msg: FluxMsg, record: Record) -> None:
        """Queue one record (waits while the queue is full: the pull loop's backpressure)."""
        if self.closed:
            self.bus._settle(record, False)
            return
        await self.queue.put((msg, record))
        if self.closed:  # closed while this put waited: nobody will take it
            self._give_back_queued()

    async def _consume(self) -> None:
        q = self.queue
        gear, port, bus = self.gear, self.port, self.bus
        while True:
            msg, record = await q.get()
            finished = False
            try:
                if gear.state == GearState.STOPPED:  # the kill switch stopped it: JetStream keeps the rest
                    continue
                await deliver(gear, port, msg)
                self.processed += 1
                finished = True
                bus._settle(record, True)
            finally:
                q.task_done()
                if not finished:  # stopped gear, or cancelled mid-processing: let JetStream redeliver
                    bus._settle(record, False)

    def depth(self) -> int:
        return self.queue.qsize()

    async def join(self) -> None:
        # A drain (shutdown, or this source retiring in a reload): no new fetches meanwhile,
        # or a busy stream would keep the queue from ever emptying.
        async with self.bus.hold():
            await self.queue.join()

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
            _msg, record = self.queue.get_nowait()
            self.queue.task_done()
            self.bus._settle(record, False)


class Pull:
    """One bound pull subscription and the pull request its last fetch may have left open.

    nats-py's `fetch` returns when it has some messages or its timeout passed, but the pull
    request it sent lives at the Snake until it has `batch` messages or its expiry (the fetch
    timeout) passes: messages delivered meanwhile wait in the subscription's queue for the
    next fetch. `give_back` NAKs those, and waits out the open request, when nothing will
    fetch again soon (a stop, every input gone or killed)."""

    def __init__(self, psub):
        self.psub = psub
        self.open_until = 0.0  # loop time after which the last pull request cannot deliver

    async def fetch(self, batch: int, timeout: float) -> list:
        loop = asyncio.get_running_loop()
        older = self.open_until
        self.open_until = max(older, loop.time() + timeout + PULL_EXPIRY_MARGIN_S)
        msgs = await self.psub.fetch(batch, timeout=timeout)
        if len(msgs) >= batch:
            # This request got all it asked for (or was never sent: nats-py serves a batch from
            # the queue first), but one an earlier fetch left open may still deliver: a NAK
            # given back makes the Snake redeliver to it at once, into a queue nobody reads.
            self.open_until = older if older > loop.time() else 0.0
        return msgs

    async def give_back(self, nak) -> int:
        """NAK every message waiting in the subscription and every one the open request still
        delivers; returns how many. A session whose subscription holds nothing back (the
        in-memory test session) has no `_sub`: nothing to do."""
        sub = getattr(self.psub, "_sub", None)  # nats-py's Subscription behind its PullSubscription
        if sub is None:
            return 0
        n = await self._nak_until(sub, nak, lambda: self.open_until - asyncio.get_running_loop().time() > 0)
        self.open_until = 0.0
        return n

    async def close(self, nak) -> int:
        """`give_back`, then drain the subscription: UNSUB and a round trip to the Snake, so a
        message it sent before it saw the UNSUB (however late the expiry came) is NAKed too;
        then it is gone. Returns how many were NAKed."""
        n = await self.give_back(nak)
        sub = getattr(self.psub, "_sub", None)
        if sub is None:
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
            return n
        drain = asyncio.ensure_future(sub.drain())
        try:
            n += await self._nak_until(sub, nak, lambda: not drain.done(), limit=CLOSE_DRAIN_S)
        finally:
            if not drain.done():
                drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        return n

    @staticmethod
    async def _nak_until(sub, nak, more, limit: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        n = 0
        while more() or not sub._pending_queue.empty():
            if deadline is not None and loop.time() > deadline:
                break
            try:
                msg = await sub.next_msg(timeout=0.05)
            except TimeoutError:
                continue
            except Exception:  # the connection is gone: JetStream redelivers after ack_wait
                break
            if msg.headers and msg.headers.get("Status"):  # 404/408/409 end a request, 100 is a heartbeat
                continue
            await nak(msg, None)
            n += 1
        return n

    async def info(self):
        """The consumer's info, or None (a session without it, or the call failed)."""
        get = getattr(self.psub, "consumer_info", None)
        if get is None:
            return None
        try:
            return await get()
        except Exception:
            return None


class OrderGuard:
    """Watches the order promise of the receiving side. Messages delivered to an earlier
    connection (a crashed incarnation, a lost link) and never settled come back only after
    the consumer's ack_wait, after newer ones: `bind`, `arrived` and `caught_up` count them
    (WARNING, `unsettled_at_bind`); `check` is False for a message older in the stream than one
    already routed for its subject (logged at ERROR once per subject and episode).

    Counting exactly. At bind, the consumer's `num_ack_pending` less what this Rack still holds
    are the suspects, but JetStream counts a NAKed message as pending until it is acked again:
    what the earlier incarnation gave back at its stop (NAKed in order, for an immediate
    redelivery) is among them, and it is not late. JetStream serves its redelivery queue before
    any new message, so the suspects that arrive redelivered (num_delivered > 1, at or below the
    stream sequence delivered at bind) before the first new message, or before a fetch finds
    nothing, were given back (or their ack_wait had run out already): not late. What is left
    then is what comes after ack_wait (or a NAK delay the earlier incarnation gave), behind newer
    messages: that number is logged and kept.
    (The old count, taken at bind, named every given-back message of a graceful restart.)"""

    def __init__(self):
        self.last_seq: dict[str, int] = {}  # subject -> highest stream sequence routed
        self._reordered: set[str] = set()
        self.unsettled_at_bind = 0  # the last bind's count, once known
        self._suspects = 0  # while counting: pending at bind, not yet seen come back
        self._bind_seq = 0
        self._bind_what: tuple[str, object] = ("", None)

    def bind(self, info, holding: int, consumer: str) -> None:
        """A subscription was bound: `info` the consumer's info (None: unknown), `holding` the
        deliveries this Rack still processes (it settles them itself)."""
        self._suspects = 0
        if info is None:
            return
        suspects = int(info.num_ack_pending or 0) - holding
        if suspects <= 0:
            self.unsettled_at_bind = 0
            return
        self._suspects = suspects
        delivered = getattr(info, "delivered", None)
        self._bind_seq = int(getattr(delivered, "stream_seq", 0) or 0) if delivered is not None else 0
        self._bind_what = (consumer, getattr(info.config, "ack_wait", None))

    def arrived(self, js_msg) -> None:
        """A message fetched on the Rack's own consumer, before it is routed."""
        if not self._suspects:
            return
        try:
            delivered = js_msg.metadata.num_delivered
            seq = js_msg.metadata.sequence.stream
        except Exception:
            return
        if delivered > 1 and (not self._bind_seq or seq <= self._bind_seq):
            self._suspects -= 1  # given back (or its ack_wait was over): redelivered first
            if not self._suspects:
                self.unsettled_at_bind = 0
        else:  # a first delivery: JetStream's redelivery queue is empty
            self.caught_up()

    def caught_up(self) -> None:
        """Nothing more comes back promptly (a new message arrived, or a fetch found nothing):
        the suspects left are late; say how many."""
        lost, self._suspects = self._suspects, 0
        if not lost:
            return
        self.unsettled_at_bind = lost
        consumer, ack_wait = self._bind_what
        log.warning("guaranteed lane: %d message(s) of %s were delivered to an earlier connection and not "
                    "settled; JetStream redelivers them after ack_wait (%ss) or their NAK delay, after newer ones",
                    lost, consumer, ack_wait)  # fmt: skip

    def check(self, js_msg) -> bool:
        try:
            seq = js_msg.metadata.sequence.stream
        except Exception:
            return True
        subject = js_msg.subject
        last = self.last_seq.get(subject, 0)
        if seq >= last:
            self.last_seq[subject] = seq
            self._reordered.discard(subject)
            return True
        if subject not in self._reordered:
            self._reordered.add(subject)
            log.error("guaranteed lane: message %d on %s arrives after message %d (redelivered after ack_wait): "
                      "processed out of order", seq, subject, last)  # fmt: skip
        return False


def park_received(directory: str | None, js_msg, data: bytes, reason: str, why: str, record: int | None = None) -> str:
    """A durable copy of a received message the Rack cannot use (fluxrig/wal/parked.py, beside
    the lane WAL), logged at ERROR. Returns where it went, or "" when it could not be written
    (no lane WAL open, a full disk): the caller then does not ack, JetStream keeps it.

    `record` is the index of the record within its batch when only that record is parked: its
    key is then `in-<stream seq>-r<index>`, so the bad records of one batch are a copy each
    (one key for all of them kept the first and logged the others as parked in its file), and a
    redelivery of the batch finds each copy again instead of writing it twice."""
    try:
        seq = js_msg.metadata.sequence.stream
    except Exception:
        seq = None
    # Without a stream seq (not a JetStream delivery): a digest of the bytes, the same in every
    # process (hash() is salted per process, so a restart would park the same message again).
    key = f"in-{seq:016x}" if seq is not None else f"in-{hashlib.blake2b(data, digest_size=8).hexdigest()}"
    if record is not None:
        key += f"-r{record}"
    headers = getattr(js_msg, "headers", None) or {}
    # where it came from, for the operator (`fluxrig inspect-wal DIR --parked` lists it)
    info = {"subject": js_msg.subject, "stream_seq": seq, "msg_id": headers.get("Nats-Msg-Id"), "why": why}
    if record is not None:
        info["record_index"] = record
    try:
        if directory is None:
            raise FileNotFoundError("the lane WAL is not open")
        where = park(directory, key, data, reason, info=info)
    except Exception as exc:
        log.error("guaranteed lane: message %s on %s %s, and cannot be parked (%s); left in JetStream",
                  key, js_msg.subject, why, exc)  # fmt: skip
        return ""
    log.error("guaranteed lane: message %s on %s %s; acknowledged, copy parked in %s",
              key, js_msg.subject, why, where)  # fmt: skip
    return where
