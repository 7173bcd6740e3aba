"""WalPublisher: the one WAL -> JetStream pump, for the guaranteed lane and for telemetry.

Job. Ship the records of an AsyncWal to JetStream through a `SnakeSession`, many records per
JetStream message, pipelined, and acknowledge each record in the WAL only once the Snake has
stored (PubAck) the batch that carried it. A `BatchCodec` says what a record becomes (lane:
fluxrig.wire.batch, CBOR; telemetry: fluxrig.wire.telemetry, NDJSON per kind); the pump is
the same for both. Its decisions are sans-IO in fluxrig/agent/pump.py (WindowPlan: batches,
window, restart point; AimdPacer: the window; ReadSizer: the step); here is the driver and
the one measurement it makes itself (LagProbe: a periodic timer's lateness, the wait any
live callback on this loop sees).

Loop. One task: settle finished publishes (acks to the plan, the pacer, and, in slices, to
the WAL); read and convert one step of records (sized to `step_budget` of loop time, in the
loop thread: the WAL's reader thread would hand the GIL back and forth instead); cut and
publish batches while the window, a rate cap and the duty cycle allow; yield; when there is
nothing to do, wait for an ack, new WAL records, or the next look at the session's state.

Delivery. Batches are published in WAL order per subject with a `Nats-Msg-Id` the codec
derives from the batch's records, so an identical re-send is dropped by JetStream's duplicate
window; a re-send cut with other boundaries is not, and the receiver masks the records it
already has (record ids: lane, the per-record LRU in lanes.py; telemetry, the Mixer's
idempotent ingest). So: at least once from here, once at the receiver.

Failure. A failed publish (timeout, no responders, `SessionUnavailable`) stops issuing; the
rest of the window settles (their acks still count), then the plan restarts from the first
unacknowledged record after `retry_wait`, cutting the lost batches again with the same
records. When the session stops being usable the window is abandoned at once (its acks would
never come: no waiting out `publish_timeout`). The WAL keeps everything unacknowledged
meanwhile, across restarts of the Rack. Order across a failure is best effort: a batch
re-sent after a failure can be stored after later batches of its window.

Quota full. A publish the Snake refuses because a limit of the stream is reached (discard NEW:
JetStream's err_code 10077 "maximum ... exceeded", fluxrig_mixer/streams.py) is push-back, not
an error of the records: they stay in the WAL, the retry waits grow (x2 per refusal, up to
QUOTA_RETRY_MAX_S) so a full quota is not hammered, `quota_rejections` counts the refusals,
`quota_full` says the state, and one WARNING is logged when it starts and one when a batch is
stored again (with how many records waited meanwhile).

Records that can never go (the codec says why: DropReason) are acknowledged only after a
durable copy is parked beside the WAL (fluxrig/wal/parked.py, `fluxrig inspect-wal DIR
--parked`), counted per reason and logged at ERROR (every one of the first LOGGED_DROPS, then
one line per DROP_LOG_EVERY with the total). If the copy cannot be written the record stays
unacknowledged in the WAL (it is parked again at the next start), never lost.

Pacing. The AIMD window always applies (grow while the round trip and the loop's lag stay
inside `rtt_budget` and `lag_budget`, halve when not); `rate` > 0 adds a fixed cap in
records/s. A budget of 0 turns its signal off. At DEBUG the pump logs its pacing every
REPORT_EVERY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque

from ..wal.parked import park
from .pump import (
    DEFAULT_LIMITS,
    DEFAULT_PACING,
    AimdPacer,
    Batch,
    BatchCodec,
    DropReason,
    Entry,
    Pacing,
    PumpLimits,
    ReadSizer,
    WindowPlan,
)
from .session import SessionState, SnakeSession

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
    "LagProbe",
    "WalPublisher",
    "REPORT_EVERY_S",
    "ACK_SLICE",
    "QUOTA_RETRY_MAX_S",
    "is_quota_full",
]

log = logging.getLogger("fluxrig.agent.publisher")

REPORT_EVERY_S = 2.0
ACK_SLICE = 128
#: Every dropped record is logged at ERROR up to this many per reason, then one line per DROP_LOG_EVERY.
LOGGED_DROPS = 100
DROP_LOG_EVERY = 1000
#: Longest wait between retries while the Snake refuses batches for a full quota.
QUOTA_RETRY_MAX_S = 5.0
#: JetStream's "store failed" error code; with "maximum ... exceeded" a discard-NEW limit refused it.
JS_STORE_FAILED = 10077


def is_quota_full(exc: BaseException) -> bool:
    """True when a publish was refused because a stream limit (discard NEW) is reached."""
    text = str(getattr(exc, "description", "") or "")
    return getattr(exc, "err_code", None) == JS_STORE_FAILED and "maximum" in text and "exceeded" in text


class LagProbe:
    """The event loop's lag: a timer every `period` s measures how late it fires. Runs only
    while `ensure_running` is called (the pump has work). `lag()` is the second worst
    lateness of the last `window` ticks: a lag that lasted, not one stall (a GC pause, the
    process preempted once), which backing off the pump would not have prevented."""

    def __init__(self, period: float, window: int = 8):
        self.period = period
        self.max_seen = 0.0
        self._recent: deque[float] = deque(maxlen=max(2, window))
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._idle_ticks = 0
        self._wanted = False

    def ensure_running(self) -> None:
        self._wanted = True
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._due = loop.time() + self.period
            self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = now - self._due
        self._recent.append(late)
        if late > self.max_seen:
            self.max_seen = late
        if not self._wanted:
            self._idle_ticks += 1
            if self._idle_ticks > 10:  # idle: stop waking the loop
                self._handle = None
                return
        else:
            self._idle_ticks = 0
        self._wanted = False
        self._due = now + self.period
        self._handle = loop.call_at(self._due, self._tick)

    def lag(self) -> float:
        recent = self._recent
        if len(recent) < 2:
            return 0.0
        return sorted(recent)[-2]

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class WalPublisher:
    """Ships an AsyncWal through a SnakeSession with a BatchCodec (see the module docstring).
    `start()` once the loop runs; `close()` settles what is in flight (up to `close_wait`)
    and stops; the WAL stays open (its owner closes it)."""

    def __init__(
        self,
        wal,
        session: SnakeSession,
        codec: BatchCodec,
        *,
        name: str = "wal-publisher",
        limits: PumpLimits = DEFAULT_LIMITS,
        pacing: Pacing = DEFAULT_PACING,
        publish_timeout: float = 5.0,
        retry_wait: float = 0.5,
        idle_wait: float = 0.25,
        state_poll: float = 0.05,
        close_wait: float = 3.0,
        read_in_loop: bool = True,
        park_dropped: bool = True,
    ):
        self.wal = wal
        self.session = session
        self.codec = codec
        self.name = name
        self.limits = limits
        self.pacing = pacing
        self.publish_timeout = publish_timeout
        self.retry_wait = retry_wait
        self.idle_wait = idle_wait
        self.state_poll = state_poll
        self.close_wait = close_wait
        self.read_in_loop = read_in_loop
        self.park_dropped = park_dropped
        self.park_failures = 0
        self.pacer = AimdPacer(pacing)
        self.sizer = ReadSizer(limits, pacing.step_budget)
        self.probe = LagProbe(pacing.lag_period, pacing.lag_window)
        self.plan = WindowPlan(limits, wal.cursor + 1)
        self.m = dict.fromkeys(
            ("read", "published", "batches", "publish_failures", "restarts", "abandoned", "acked_bytes",
             "quota_rejections"), 0
        )  # fmt: skip
        self.quota_full = False
        self._quota_retry = 0.0
        self._quota_since_published = 0
        self.dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.last_error = ""
        self._tasks: dict[asyncio.Task, Batch] = {}
        self._done: deque = deque()  # (batch, exception or None, rtt, was_full)
        self._unacked: deque[int] = deque()  # stored at the Snake (or dropped), not yet acked in the WAL
        self._wake: asyncio.Future | None = None  # resolved by a finished publish
        self._progress = asyncio.Event()
        self._commit_wait: asyncio.Task | None = None
        self._next_issue_at = 0.0
        self._failed = False
        self._closing = False
        self._reported = 0.0
        self._task: asyncio.Task | None = None

    # -- lifecycle

    def start(self) -> None:
        if self._task is None:
            self.plan = WindowPlan(self.limits, self.wal.cursor + 1)
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def close(self) -> None:
        """Stop issuing; let the window settle up to `close_wait` (acks still count); cancel
        the rest (their records stay in the WAL)."""
        self._closing = True
        self._poke()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.close_wait + self.state_poll * 4)
            except (TimeoutError, asyncio.CancelledError):
                pass
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self._cancel_window()
        if self._unacked:  # stored at the Snake: acked now, or the next start re-sends them
            self.wal.ack_many(list(self._unacked))
            self._unacked.clear()
        self.probe.stop()
        if self._commit_wait is not None:
            self._commit_wait.cancel()
            self._commit_wait = None

    # -- metrics

    @property
    def acked_bytes(self) -> int:
        return self.m["acked_bytes"]

    async def wait_progress(self, timeout: float) -> None:
        """Until the next record is acknowledged (or `timeout`): a waiter for backlog room."""
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout)

    def metrics(self) -> dict:
        m = dict(self.m)
        m.update(
            dropped={str(k): v for k, v in self.dropped.items()},
            backlog_records=max(0, self.wal.committed_seq - self.wal.cursor),
            inflight_batches=self.plan.inflight_batches,
            inflight_records=self.plan.inflight_records,
            records_per_batch=round(m["published"] / m["batches"], 1) if m["batches"] else 0.0,
            window=round(self.pacer.limit, 2),
            window_increases=self.pacer.increases,
            window_decreases=self.pacer.decreases,
            rtt_ms=round(self.pacer.rtt * 1000, 2),
            loop_lag_max_ms=round(self.probe.max_seen * 1000, 2),
            read_step=self.sizer.step(),
            rate_cap=self.pacing.rate,
            quota_full=self.quota_full,
        )
        return m

    # -- the driver

    async def _run(self) -> None:
        session = self.session
        while not self._closing:
            try:
                if session.state is not SessionState.USABLE:
                    if self._tasks:
                        await self._abandon("the Snake session is %s" % session.state)
                    await session.wait_usable(self.idle_wait)
                    continue
                self._settle()
                if self._failed:
                    await self._recover()
                    continue
                busy = self._ack_some()
                busy = await self._fill() or busy
                busy = self._issue() or busy
                if log.isEnabledFor(logging.DEBUG):
                    self._report()
                if busy:
                    await asyncio.sleep(0)  # let live traffic run between steps
                else:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a failed WAL read: never let the pump die
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("%s", self.name)
                await self._cancel_window()
                self.plan.restart()
                await asyncio.sleep(self.retry_wait)

    def _report(self) -> None:
        """Every REPORT_EVERY_S at DEBUG: what the pacing decided and why (tuning by log)."""
        now = time.monotonic()
        if now - self._reported < REPORT_EVERY_S:
            return
        self._reported = now
        m = self.metrics()
        log.debug(
            "%s: published %d in %d batches (%.1f per batch), window %.2f (+%d/-%d), rtt %.1f ms, "
            "loop lag max %.1f ms, read step %d, backlog %d",
            self.name, m["published"], m["batches"], m["records_per_batch"], m["window"], m["window_increases"],
            m["window_decreases"], m["rtt_ms"], m["loop_lag_max_ms"], m["read_step"], m["backlog_records"],
        )  # fmt: skip
        self.probe.max_seen = 0.0

    async def _fill(self) -> bool:
        """Read and convert one step of records when the plan wants more."""
        plan, wal = self.plan, self.wal
        n = plan.want_read(self.sizer.step())
        if not n or wal.committed_seq < plan.next_read:
            return False
        rack = self.session.rack_name or ""
        t0 = time.perf_counter()
        if self.read_in_loop and hasattr(wal, "wal"):
            # In the loop thread on purpose: the WAL's reader thread runs Python too, and the
            # GIL hand-over (5 ms switch interval) then delays the loop by up to 5 ms per read.
            records = wal.wal.read_from(plan.next_read, n)
        else:
            records = await wal.read_from(plan.next_read, n)
        dropped = plan.add(records, self.codec.parse, rack)
        self.sizer.measured(len(records), time.perf_counter() - t0)
        self.m["read"] += len(records)
        if dropped:
            payloads = {r.seq: r.payload for r in records}
            for seq, size, reason in dropped:
                self.dropped[reason] += 1
                if self._park(seq, payloads.get(seq, b""), reason):
                    self.m["acked_bytes"] += size
                    self._unacked.append(seq)
        return bool(records)

    def _park(self, seq: int, payload: bytes, reason) -> bool:
        """Park a durable copy of a record that can never go; True once it may be acked."""
        where = "not parked"
        if self.park_dropped:
            directory = getattr(getattr(self.wal, "wal", self.wal), "directory", None)
            try:
                where = park(directory, f"out-{seq:016x}", payload, str(reason))
            except Exception as exc:
                self.park_failures += 1
                log.error("%s: WAL record %d (%s) cannot be parked (%s); it stays unacknowledged in the WAL",
                          self.name, seq, reason, exc)  # fmt: skip
                return False
        n = self.dropped[reason]
        if n <= LOGGED_DROPS or n % DROP_LOG_EVERY == 0:
            log.error("%s: WAL record %d is %s and can never be sent: dropped (%d so far), copy in %s",
                      self.name, seq, reason, n, os.path.basename(where) if self.park_dropped else where)  # fmt: skip
        return True

    def _issue(self) -> bool:
        """Publish batches while the window, the rate cap and the duty cycle allow."""
        plan, pacer = self.plan, self.pacer
        loop = asyncio.get_running_loop()
        issued = False
        rack = self.session.rack_name or ""
        wal_id = self.wal.wal_id
        while True:
            now = loop.time()
            if now < self._next_issue_at:
                break
            window = pacer.window
            batch = plan.cut(window, self.wal.committed_seq >= plan.next_read)
            if batch is None:
                break
            payload, headers = self.codec.encode(batch, rack, wal_id)
            # The window limits only when it is full and records wait behind it (more of this
            # subject than the batch took, or a WAL backlog not read yet): then more batches
            # in flight move more records. A window full of small batches of trickling
            # subjects with nothing behind them is what batching wants instead.
            waiting = batch.full or self.wal.committed_seq >= plan.next_read
            was_full = waiting and plan.inflight_batches >= window
            batch = batch.sealed()
            task = loop.create_task(self._publish(batch, payload, headers, was_full))
            self._tasks[task] = batch
            issued = True
            gap = pacer.pause()
            if self.pacing.rate:
                gap = max(gap, len(batch) / self.pacing.rate)
            if gap:
                self._next_issue_at = max(self._next_issue_at, now) + gap
        if issued and self.pacing.lag_budget:
            self.probe.ensure_running()
        return issued

    async def _publish(self, batch: Batch, payload: bytes, headers: dict, was_full: bool) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        error = None
        try:
            await self.session.publish(batch.subject, payload, headers=headers, timeout=self.publish_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        self._done.append((batch, error, loop.time() - t0, was_full))
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _ack_some(self) -> bool:
        """Ack up to ACK_SLICE records in the WAL (True when more wait). In slices because a
        WAL ack costs 5-8 us (a lock and a few bisects): a whole 1000-record batch at once
        held the loop for 5-8 ms, measured."""
        q = self._unacked
        if not q:
            return False
        n = min(len(q), ACK_SLICE)
        self.wal.ack_many([q.popleft() for _ in range(n)])
        self._progress.set()
        return bool(q)

    def _settle(self) -> None:
        """Apply finished publishes: acks to the WAL and the pacer, failures to the plan."""
        done = self._done
        if not done:
            return
        loop = asyncio.get_running_loop()
        plan, pacer = self.plan, self.pacer
        acked = []
        while done:
            batch, error, rtt, was_full = done.popleft()
            if error is None:
                if self.quota_full:
                    self._quota_cleared(batch)
                seqs = plan.acked(batch)
                if seqs:
                    acked.extend(seqs)
                    self.m["published"] += len(seqs)
                    self.m["batches"] += 1
                    self.m["acked_bytes"] += batch.size
                    pacer.on_ack(loop.time(), rtt, self.probe.lag(), was_full)
            else:
                plan.failed(batch)
                if is_quota_full(error):
                    self._quota_refused(batch, error)
                if not self._failed:
                    self._failed = True
                    self.m["publish_failures"] += 1
                    self.last_error = f"{type(error).__name__}: {error}"[:500]
                    pacer.on_failure(loop.time())
        if acked:
            self._unacked.extend(acked)
        for t in [t for t in self._tasks if t.done()]:
            del self._tasks[t]

    async def _recover(self) -> None:
        """A publish failed: let the window settle (abandon it if the session drops), then
        restart from the first unacknowledged record after `retry_wait`."""
        while self._tasks:
            if self.session.state is not SessionState.USABLE or self._closing:
                await self._abandon("the Snake session dropped with publishes in flight")
                break
            await asyncio.wait(list(self._tasks), timeout=self.state_poll)
            self._settle()
        self._settle()
        seq = self.plan.restart()
        self.m["restarts"] += 1
        self._failed = False
        log.debug("%s: publish failed (%s); restarting from record %d", self.name, self.last_error, seq)
        await asyncio.sleep(self._quota_retry if self.quota_full else self.retry_wait)

    def _quota_refused(self, batch: Batch, error: BaseException) -> None:
        self.m["quota_rejections"] += 1
        self._quota_retry = min(QUOTA_RETRY_MAX_S, max(self.retry_wait, self._quota_retry * 2))
        if not self.quota_full:
            self.quota_full = True
            self._quota_since_published = self.m["published"]
            log.warning(
                "%s: the Snake refused a batch on %s (%s): its quota is full; %d records wait in the WAL and are "
                "retried (every %.1fs at most)",
                self.name, batch.subject, getattr(error, "description", error),
                max(0, self.wal.committed_seq - self.wal.cursor), QUOTA_RETRY_MAX_S,
            )  # fmt: skip

    def _quota_cleared(self, batch: Batch) -> None:
        self.quota_full = False
        self._quota_retry = 0.0
        log.warning("%s: the Snake stores batches again (%s); %d refusals so far",
                    self.name, batch.subject, self.m["quota_rejections"])  # fmt: skip

    async def _abandon(self, why: str) -> None:
        """The session is gone: no ack will come for what is in flight. Cancel it and restart."""
        self.m["abandoned"] += len(self._tasks)
        await self._cancel_window()
        self.plan.restart()
        self.m["restarts"] += 1
        self._failed = False
        self.last_error = why
        self.pacer.on_failure(asyncio.get_running_loop().time())

    async def _cancel_window(self) -> None:
        window = dict(self._tasks)
        for t in window:
            t.cancel()
        if window:
            await asyncio.gather(*window, return_exceptions=True)
        self._settle()  # acks that came before the cancel still count
        for batch in window.values():
            self.plan.failed(batch)  # a no-op for the acked ones
        self._tasks.clear()

    async def _idle(self) -> None:
        """Nothing to do now: wait for an ack, new records in the WAL, the next issue time,
        or (with publishes in flight) the next look at the session's state."""
        if self._done or self._closing:
            return
        loop = asyncio.get_running_loop()
        timeout = self.state_poll if self._tasks else self.idle_wait
        if self._next_issue_at > loop.time():
            timeout = min(timeout, self._next_issue_at - loop.time())
        if self._wake is None or self._wake.done():
            self._wake = loop.create_future()
        waits = [self._wake]
        if self.plan.want_read(1) and self.wal.committed_seq < self.plan.next_read:
            if self._commit_wait is None or self._commit_wait.done():
                self._commit_wait = loop.create_task(self.wal.wait_committed(self.plan.next_read - 1, timeout=None))
            waits.append(self._commit_wait)
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
