"""The WAL pump's decisions, sans-IO: what goes in which batch, when the window grows, how
much one step reads. No asyncio, no clock (times come from the caller), no I/O; the driver is
fluxrig/agent/publisher.py (`WalPublisher`), whose docstring tells the whole story.

    WindowPlan   records read -> batches: grouped by destination subject (order kept per
                 subject), at most `max_batch_records` records and `max_batch_bytes` bytes each,
                 at most `window` batches and `max_inflight_bytes` bytes unacknowledged; with a
                 backlog behind it and a batch in flight, a batch that is not full waits for
                 the next read (full batches); which WAL records to ack when a batch is acked;
                 where to restart after a failure (the first unacknowledged record, skipping
                 the ones acked beyond it, the lost batches cut again alike).
    AimdPacer    the window: additive increase (+1 batch per round trip while the window was
                 the limit: full, with records waiting behind it) as long as the publish round
                 trip and the event loop's lag stay inside their budgets; multiplicative
                 decrease (x `decrease`, once per round trip) when either does not, or a
                 publish fails: the shape of Vector's adaptive request concurrency. Below 1
                 the window is a duty cycle: one batch per rtt/limit.
    ReadSizer    records per read-and-convert step: as many as fit in `step_budget` of loop
                 time at the measured cost per record.

Limits are named (PumpLimits, Pacing) and checked when built: ValueError for a bad one.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

__all__ = [
    "Entry",
    "Batch",
    "DropReason",
    "BatchCodec",
    "PumpLimits",
    "Pacing",
    "DEFAULT_LIMITS",
    "DEFAULT_PACING",
    "WindowPlan",
    "AimdPacer",
    "ReadSizer",
]


class DropReason(StrEnum):
    """Why a record is acknowledged without being published (counted per reason)."""

    UNDECODABLE = "undecodable"  # it never will decode
    FOREIGN = "foreign"  # a subject of another Rack (this one was renamed): never publishable


@dataclass(frozen=True, slots=True)
class Entry:
    """One WAL record ready for a batch: `size` is what it adds to a batch (the byte caps and
    the backlog accounting), `item` what the codec encodes."""

    seq: int
    subject: str
    size: int
    item: Any


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive unacknowledged records of one subject, in WAL order. `entries` are there
    until it is encoded; what stays in flight is `sealed()`: the seqs in one array, so a
    window of thousands of records is a handful of objects for the garbage collector (a
    full collection over every in-flight Entry took 12 ms, measured)."""

    number: int
    subject: str
    seqs: array
    size: int
    full: bool = False  # cut by a limit with more of its subject's records waiting
    entries: tuple[Entry, ...] = ()

    @property
    def first(self) -> int:
        return self.seqs[0]

    @property
    def last(self) -> int:
        return self.seqs[-1]

    def __len__(self) -> int:
        return len(self.seqs)

    def sealed(self) -> Batch:
        return Batch(self.number, self.subject, self.seqs, self.size, self.full)


class BatchCodec(Protocol):
    """What a record becomes on the wire. Both methods are pure (no I/O)."""

    def parse(self, seq: int, payload: bytes, rack: str) -> Entry | DropReason:
        """The Entry of one WAL record, or why it is dropped."""
        ...

    def encode(self, batch: Batch, rack: str, wal_id: str) -> tuple[bytes, dict[str, str]]:
        """(payload, headers incl. Nats-Msg-Id) of one batch."""
        ...


@dataclass(frozen=True, slots=True)
class PumpLimits:
    """Bounds of one pump: every limit named, each a parameter."""

    max_batch_records: int = 512
    max_batch_bytes: int = 1 << 20  # well under the Snake's max_payload (8 MiB)
    max_inflight_bytes: int = 16 << 20
    max_read_records: int = 1024
    min_read_records: int = 16

    def __post_init__(self):
        if self.max_batch_records < 1 or self.max_batch_bytes < 1 or self.max_inflight_bytes < 1:
            raise ValueError("batch and window limits must be at least 1")
        if not 1 <= self.min_read_records <= self.max_read_records:
            raise ValueError("min_read_records must be in 1..max_read_records")


@dataclass(frozen=True, slots=True)
class Pacing:
    """The AIMD window and its budgets (see the module docstring). `rate` > 0 caps records/s;
    a budget of 0 turns its signal off."""

    rate: float = 0.0
    initial_window: float = 4.0
    min_window: float = 0.05
    max_window: int = 32
    rtt_budget: float = 0.25
    lag_budget: float = 0.005
    step_budget: float = 0.002
    decrease: float = 0.5
    increase: float = 1.0
    lag_period: float = 0.01
    lag_window: int = 8

    def __post_init__(self):
        if not 0 < self.min_window <= self.initial_window <= self.max_window:
            raise ValueError("need 0 < min_window <= initial_window <= max_window")
        if not 0 < self.decrease < 1 or self.increase <= 0:
            raise ValueError("decrease must be in (0, 1) and increase positive")
        if self.rate < 0 or self.rtt_budget < 0 or self.lag_budget < 0 or self.step_budget <= 0:
            raise ValueError("rate and budgets must not be negative (step_budget positive)")


DEFAULT_LIMITS = PumpLimits()
DEFAULT_PACING = Pacing()


# -- sans-IO: the plan ------------------------------------------------------------------------


class WindowPlan:
    """Which records go in which batch, which to ack, where to restart. No I/O, no clock.

    Use: `want_read()` records are read from `next_read` and handed to `add`; `cut(window)`
    returns the next batch to publish (None when none may go now); `acked(batch)` or `drop`
    returns the seqs to ack in the WAL; after a failure, once nothing is in flight any more
    (`failed` for each unsettled batch), `restart()` says where to read again, and the
    batches that were not acknowledged are cut again with the same records (the same
    Nats-Msg-Id: a copy JetStream already stored is dropped, not stored twice)."""

    def __init__(self, limits: PumpLimits, next_read: int):
        self.limits = limits
        self.next_read = next_read
        self._pending: dict[str, deque[Entry]] = {}
        self._pending_records = self._pending_bytes = 0
        self._inflight: dict[int, Batch] = {}
        self._inflight_bytes = 0
        self._inflight_records = 0
        self._ledger: deque[int] = deque()  # seqs read and not skipped, in order
        self._done: set[int] = set()  # seqs in the ledger already acknowledged
        self._skip: set[int] = set()  # acknowledged beyond a restart point: never read again
        self._lost: list[Batch] = []  # failed since the last restart
        self._recut: dict[int, tuple[int, ...]] = {}  # first seq -> seqs of a batch to cut again alike
        self._short = False  # a batch to cut again waits for records not read yet
        self._number = 0

    # -- reading

    def want_read(self, step: int) -> int:
        """How many records to read now (0: enough are waiting for a batch)."""
        if self._pending_records >= self.limits.max_batch_records and not self._short:
            return 0
        return step

    def add(
        self, records: Iterable, parse: Callable[[int, bytes, str], Entry | DropReason], rack: str = ""
    ) -> list[tuple[int, int, DropReason]]:
        """Records read from `next_read` on (objects with .seq and .payload, in order): parsed
        (`parse(seq, payload, rack)`) into pending entries. Returns the dropped ones as (seq, size, reason); they count as
        acknowledged here and the caller acks them in the WAL."""
        dropped = []
        self._short = False
        skip = self._skip
        last = None
        for r in records:
            seq = last = r.seq
            if skip and seq in skip:
                skip.discard(seq)
                continue
            got = parse(seq, r.payload, rack)
            self._ledger.append(seq)
            if type(got) is Entry:
                q = self._pending.get(got.subject)
                if q is None:
                    q = self._pending[got.subject] = deque()
                q.append(got)
                self._pending_records += 1
                self._pending_bytes += got.size
            else:
                dropped.append((seq, len(r.payload), got))
                self._done.add(seq)
        if last is not None:
            self.next_read = last + 1
            if skip:  # a record the WAL no longer has (its size cap) is never read: forget it
                self._skip = {s for s in skip if s >= self.next_read}
            self._trim()
        return dropped

    # -- batching

    def cut(self, window: int, more_coming: bool = False) -> Batch | None:
        """The next batch when the window has room: the subject whose oldest pending record
        is oldest, its consecutive pending records up to the batch limits. `more_coming`
        (records committed but not read yet): while a batch is in flight anyway, a batch
        that is not full waits for the next read, so a backlog goes in full batches (fewer
        publishes, each carrying more) without delaying a lone record."""
        if not self._pending_records or len(self._inflight) >= window:
            return None
        if self._inflight and self._inflight_bytes >= self.limits.max_inflight_bytes:
            return None
        subject = min(self._pending, key=lambda s: self._pending[s][0].seq)
        q = self._pending[subject]
        max_n, max_bytes = self.limits.max_batch_records, self.limits.max_batch_bytes
        if more_coming and self._inflight and self._pending_records < max_n and self._pending_bytes < max_bytes:
            return None
        again = self._recut.get(q[0].seq) if self._recut else None
        if again is not None:
            # Cut exactly as before the failure: the same records give the same Nats-Msg-Id,
            # so JetStream drops the copy it may already hold.
            if len(q) < len(again) or q[len(again) - 1].seq != again[-1]:
                if again[-1] >= self.next_read:  # not all read yet: wait for the next read
                    self._short = True
                    return None
                max_n = 0  # the WAL no longer has them all: cut as usual
            else:
                max_n, max_bytes = len(again), 1 << 62
            del self._recut[q[0].seq]
            max_n = max_n or self.limits.max_batch_records
        entries = [q.popleft()]
        size = entries[0].size
        while q and len(entries) < max_n and size + q[0].size <= max_bytes:
            e = q.popleft()
            entries.append(e)
            size += e.size
        full = bool(q)
        if not full:
            del self._pending[subject]
        self._pending_records -= len(entries)
        self._pending_bytes -= size
        self._number += 1
        batch = Batch(self._number, subject, array("q", [e.seq for e in entries]), size, full, tuple(entries))
        self._inflight[batch.number] = batch.sealed()
        self._inflight_bytes += size
        self._inflight_records += len(entries)
        return batch

    def acked(self, batch: Batch) -> list[int]:
        """The batch is stored at the Snake: its seqs, to ack in the WAL."""
        if self._inflight.pop(batch.number, None) is None:
            return []  # abandoned by a restart meanwhile
        self._inflight_bytes -= batch.size
        self._inflight_records -= len(batch)
        seqs = batch.seqs.tolist()
        self._done.update(seqs)
        self._trim()
        return seqs

    def failed(self, batch: Batch) -> None:
        """The batch was not acknowledged: its records stay unacknowledged (see restart)."""
        if self._inflight.pop(batch.number, None) is not None:
            self._inflight_bytes -= batch.size
            self._inflight_records -= len(batch)
            self._lost.append(batch)

    def restart(self) -> int:
        """Forget what is pending and in flight; read again from the first unacknowledged
        record, skipping those acknowledged after it. Returns that seq."""
        if self._ledger:
            self.next_read = self._ledger[0]
        self._skip |= self._done
        self._recut = {b.first: tuple(b.seqs) for b in (*self._lost, *self._inflight.values())}
        self._lost.clear()
        self._short = False
        self._ledger.clear()
        self._done.clear()
        self._pending.clear()
        self._pending_records = self._pending_bytes = 0
        self._inflight.clear()
        self._inflight_bytes = self._inflight_records = 0
        return self.next_read

    def _trim(self) -> None:
        ledger, done = self._ledger, self._done
        while ledger and ledger[0] in done:
            done.discard(ledger.popleft())

    # -- state

    @property
    def pending_records(self) -> int:
        return self._pending_records

    @property
    def inflight_batches(self) -> int:
        return len(self._inflight)

    @property
    def inflight_records(self) -> int:
        return self._inflight_records

    @property
    def first_unacked(self) -> int:
        return self._ledger[0] if self._ledger else self.next_read


# -- sans-IO: pacing --------------------------------------------------------------------------


class AimdPacer:
    """The pump's window, adapted per acknowledged batch (see the module docstring). Times
    are seconds; `now` comes from the caller's clock."""

    def __init__(self, pacing: Pacing = DEFAULT_PACING):
        self.p = pacing
        self.limit = float(pacing.initial_window)
        self.rtt = 0.0  # smoothed round trip
        self.increases = self.decreases = 0
        self._hold_until = 0.0

    @property
    def window(self) -> int:
        """Batches that may be in flight."""
        return max(1, int(self.limit))

    def pause(self) -> float:
        """Below a window of 1: the seconds from one batch's issue to the next (a duty cycle
        of `limit`: in flight for one round trip out of every rtt/limit). Else 0."""
        if self.limit >= 1.0:
            return 0.0
        return self.rtt / self.limit

    def on_ack(self, now: float, rtt: float, lag: float, was_full: bool) -> None:
        """One batch acknowledged after `rtt`; `lag` the loop's recent lateness (LagProbe.lag); `was_full` whether the window was what limited the pump when it went out (full,
        with records of its subject left waiting)."""
        self.rtt = rtt if not self.rtt else self.rtt * 0.8 + rtt * 0.2
        p = self.p
        over = (p.rtt_budget and rtt > p.rtt_budget) or (p.lag_budget and lag > p.lag_budget)
        if over:
            self._decrease(now)
        elif was_full and now >= self._hold_until:
            step = p.increase / self.window if self.limit >= 1.0 else p.increase * 0.1
            self.limit = min(float(p.max_window), self.limit + step)
            self.increases += 1

    def on_failure(self, now: float) -> None:
        self._decrease(now)

    def _decrease(self, now: float) -> None:
        # One decrease per round trip (or lag window): a burst of late acks, the same late
        # ticks seen by several acks, is one signal.
        if now < self._hold_until:
            return
        self.limit = max(self.p.min_window, self.limit * self.p.decrease)
        self._hold_until = now + max(self.rtt, self.p.lag_period * self.p.lag_window)
        self.decreases += 1


class ReadSizer:
    """Records per read-and-convert step, so one step takes about `budget` seconds of loop."""

    def __init__(self, limits: PumpLimits, budget: float):
        self.limits = limits
        self.budget = budget
        self.cost = 0.0  # smoothed seconds per record

    def step(self) -> int:
        if not self.cost:
            return self.limits.min_read_records * 4
        n = int(self.budget / self.cost)
        return max(self.limits.min_read_records, min(self.limits.max_read_records, n))

    def measured(self, records: int, seconds: float) -> None:
        if records:
            c = seconds / records
            self.cost = c if not self.cost else self.cost * 0.7 + c * 0.3
