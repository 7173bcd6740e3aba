"""A small in-memory Snake for unit tests of the pump and the guaranteed lane.

`FakeSession` has the shape of fluxrig.agent.session.SnakeSession and a `FakeJetStream`
behind it: streams holding what was published (in order, with a duplicate window keyed by
Nats-Msg-Id, as JetStream's), durable pull consumers with explicit ack, NAK (with a delay),
`ack_wait` redelivery and `num_delivered`. Switches a test pulls:

    drop()              the connection is lost: state down, unanswered publishes never get
                        their PubAck (as with nats-py: the request just waits), fetches fail
    restore()           connected again (generation + 1)
    fail_next(n)        the next n publishes fail (no responders) without storing anything
    lose_acks(n)        the next n publishes are stored but their PubAck is lost (timeout)
    ack_delay           seconds before a PubAck comes back (pipelining is visible)

It does no I/O; it is not a mock of nats-py, it is a stand-in for the Snake's semantics
that the lane relies on, each of which tests/test_mixer_lanes.py checks against the real one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fluxrig.agent.session import SessionState, SessionUnavailable

__all__ = ["FakeJetStream", "FakeSession", "FakeMsg", "StoredMsg"]

MSG_ID = "Nats-Msg-Id"


class NoResponders(Exception):
    pass


@dataclass
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    headers: dict


@dataclass
class _Consumer:
    stream: str
    filters: list[str]
    ack_wait: float
    next_seq: int = 1
    pending: dict = field(default_factory=dict)  # stream seq -> (deliveries, redeliver at or None)
    acked: set = field(default_factory=set)


def _matches(subject: str, pattern: str) -> bool:
    s, p = subject.split("."), pattern.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(s) == len(p)


class FakeJetStream:
    def __init__(self, duplicate_window: float = 120.0):
        self.duplicate_window = duplicate_window
        self.streams: dict[str, list[str]] = {}
        self.msgs: dict[str, list[StoredMsg]] = {}
        self.ids: dict[str, dict[str, tuple[int, float]]] = {}
        self.consumers: dict[str, _Consumer] = {}
        self.duplicates = 0
        self.changed = asyncio.Event()

    def add_stream(self, name: str, subjects: list[str]) -> None:
        self.streams[name] = subjects
        self.msgs[name] = []
        self.ids[name] = {}

    def add_consumer(self, stream: str, name: str, filters: list[str], ack_wait: float = 30.0) -> None:
        self.consumers[name] = _Consumer(stream, filters, ack_wait)

    def stream_of(self, subject: str) -> str | None:
        for name, subjects in self.streams.items():
            if any(_matches(subject, p) for p in subjects):
                return name
        return None

    def store(self, subject: str, data: bytes, headers: dict | None) -> tuple[str, int, bool]:
        stream = self.stream_of(subject)
        if stream is None:
            raise NoResponders(f"no stream for {subject}")
        ids = self.ids[stream]
        msg_id = (headers or {}).get(MSG_ID)
        now = time.monotonic()
        if msg_id and msg_id in ids and now - ids[msg_id][1] < self.duplicate_window:
            self.duplicates += 1
            return stream, ids[msg_id][0], True
        seq = len(self.msgs[stream]) + 1
        self.msgs[stream].append(StoredMsg(seq, subject, bytes(data), dict(headers or {})))
        if msg_id:
            ids[msg_id] = (seq, now)
        self.changed.set()
        return stream, seq, False

    def stored(self, stream: str) -> list[StoredMsg]:
        return list(self.msgs[stream])


class FakeMsg:
    """A fetched message: subject, data, headers, reply, metadata.num_delivered, ack(), nak()."""

    class _Meta:
        def __init__(self, stream_seq: int, delivered: int):
            self.num_delivered = delivered
            self.sequence = type("Seq", (), {"stream": stream_seq})()

    def __init__(self, session: FakeSession, consumer: str, stored: StoredMsg, delivered: int):
        self._session = session
        self._consumer = consumer
        self._seq = stored.seq
        self.subject = stored.subject
        self.data = stored.data
        self.headers = dict(stored.headers) or None
        self.reply = f"$JS.ACK.{consumer}.{stored.seq}.{delivered}"
        self.metadata = FakeMsg._Meta(stored.seq, delivered)

    async def ack(self) -> None:
        self._session._check_up("ack")
        c = self._session.js.consumers[self._consumer]
        c.pending.pop(self._seq, None)
        c.acked.add(self._seq)
        self._session.acks += 1

    async def nak(self, delay: float | None = None) -> None:
        self._session._check_up("nak")
        c = self._session.js.consumers[self._consumer]
        if self._seq in c.pending:
            n, _ = c.pending[self._seq]
            c.pending[self._seq] = (n, time.monotonic() + (delay or 0.0))
        self._session.naks += 1
        self._session.js.changed.set()


class _PullSub:
    def __init__(self, session: FakeSession, consumer: str, generation: int):
        self.session = session
        self.consumer = consumer
        self.generation = generation

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list:
        s = self.session
        deadline = time.monotonic() + (timeout or 0)
        while True:
            if s.state is SessionState.DOWN or s.generation != self.generation:
                raise ConnectionError("fake: connection lost")
            out = self._take(batch)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            s.js.changed.clear()
            try:
                await asyncio.wait_for(s.js.changed.wait(), min(remaining, 0.02))
            except TimeoutError:
                pass

    def _take(self, batch: int) -> list:
        s = self.session
        c = s.js.consumers[self.consumer]
        msgs = s.js.msgs[c.stream]
        now = time.monotonic()
        out = []
        for seq in sorted(c.pending):  # redeliveries first, oldest first
            n, at = c.pending[seq]
            if at is not None and at <= now and len(out) < batch:
                c.pending[seq] = (n + 1, now + c.ack_wait)
                out.append(FakeMsg(s, self.consumer, msgs[seq - 1], n + 1))
        while len(out) < batch and c.next_seq <= len(msgs):
            m = msgs[c.next_seq - 1]
            c.next_seq += 1
            if any(_matches(m.subject, f) for f in c.filters):
                c.pending[m.seq] = (1, now + c.ack_wait)
                out.append(FakeMsg(s, self.consumer, m, 1))
        return out


class FakeSession:
    """SnakeSession over a FakeJetStream (see the module docstring)."""

    def __init__(self, js: FakeJetStream, rack_name: str | None = "edge", *, ack_delay: float = 0.0):
        self.js = js
        self._rack = rack_name
        self._state = SessionState.USABLE
        self._generation = 1
        self._usable = asyncio.Event()
        self._usable.set()
        self.ack_delay = ack_delay
        self._fail = 0
        self._lose = 0
        self.publishes = 0
        self.acks = 0
        self.naks = 0
        self.flushes = 0
        self.published_subjects: list[str] = []

    # -- SnakeSession

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def rack_name(self) -> str | None:
        return self._rack

    @property
    def generation(self) -> int:
        return self._generation

    async def wait_usable(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._usable.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def publish(self, subject: str, payload: bytes, *, headers=None, timeout: float = 5.0):
        if self._state is not SessionState.USABLE:
            raise SessionUnavailable(self._state)
        self.publishes += 1
        generation = self._generation
        if self._fail:
            self._fail -= 1
            raise NoResponders("fake: no responders")
        stream, seq, dup = self.js.store(subject, payload, headers)
        self.published_subjects.append(subject)
        lose = self._lose > 0
        if lose:
            self._lose -= 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.ack_delay:
            await asyncio.sleep(min(self.ack_delay, timeout))
        # An ack is lost on a dropped connection (or on purpose): the caller waits out its timeout.
        while lose or self._state is SessionState.DOWN or self._generation != generation:
            if loop.time() >= deadline:
                raise TimeoutError("fake: no PubAck")
            await asyncio.sleep(min(0.01, max(0.0, deadline - loop.time())))
        return {"stream": stream, "seq": seq, "duplicate": dup}

    async def pull_subscribe(self, consumer: str, stream: str):
        if self._state is SessionState.DOWN:
            raise SessionUnavailable(self._state, f"bind consumer {consumer}")
        if consumer not in self.js.consumers:
            raise LookupError(f"fake: no consumer {consumer}")
        return _PullSub(self, consumer, self._generation)

    async def flush(self, timeout: float = 1.0) -> None:
        self.flushes += 1

    # -- switches

    def drop(self) -> None:
        self._state = SessionState.DOWN
        self._usable.clear()

    def restore(self) -> None:
        self._generation += 1
        self._state = SessionState.USABLE
        self._usable.set()
        self.js.changed.set()

    def wait_state(self) -> None:
        """Connected, but the passport does not allow traffic."""
        self._state = SessionState.WAITING
        self._usable.clear()

    def rename(self, rack: str) -> None:
        self._rack = rack

    def fail_next(self, n: int) -> None:
        self._fail = n

    def lose_acks(self, n: int) -> None:
        self._lose = n

    def _check_up(self, what: str) -> None:
        if self._state is SessionState.DOWN:
            raise ConnectionError(f"fake: cannot {what}, connection lost")
