"""asyncio front of the WAL: group commit on one writer thread, one loop callback per group.

Job: let the event loop append without ever touching the disk. `append(payload)` and
`append_nowait(payload)` stage the record (encoding and CRC in the loop thread, no I/O) and
wake the writer thread, which runs one loop of its own: it takes everything staged, hands it
to `Wal.commit()` (one `write`, one fdatasync), then posts ONE callback to the event loop for
that group, which wakes every appender the group covers; records staged meanwhile go in the
next group, started by the writer at once without a round trip through the loop. So an append
is acknowledged exactly when its record is acknowledged per the policy (fluxrig/wal/log.py):

* `always` -- the writer commits as soon as a record is staged; records staged while that
  fsync runs go in the next one (group commit: N concurrent appenders, ~1 fsync per round).
* `batch` -- the writer waits out the window, counted from the first staged record, then
  commits everything staged; it cuts the wait short once half of `max_pending_bytes` is staged,
  so a burst is written in big batches instead of being refused.
* `never` -- like `always`, without the fsync.

An append's future is resolved by its group's callback (no executor future, hop or callback
per append; the writer is woken once per loop iteration, after every appender ready in it has
staged). Measured with bench/wal.py (64 awaiting appenders): the executor hop per round and a future
per append cost p50 1.75 / p99 5.5 ms (always) and 1.1 / 2.9 ms (never) before.

Reads (`read_from`) run on a second executor thread, so a long fsync never delays the shipper's
reads, and vice versa. Acks are applied in the loop thread (memory only); the cursor is
persisted by the writer thread at most every `cursor_sync_ms` and on close.

Backpressure: `append_nowait` raises WalFull when more than `max_pending_bytes` are staged (the
caller counts the drop); `append` waits for the running commit and retries instead.

Failure and healing. A commit that fails (WalFailed) resolves the appends its group wrote
before the failure (`WalFailed.committed`) and fails the rest; appends are then refused at
once (WalFailed) while the Wal is failed. The writer thread calls `Wal.heal()` every
`heal_interval` seconds (re-probe, cut back to the last good commit, reopen: fluxrig/wal/health.py)
until the filesystem takes writes again. Each change of state is logged once at ERROR (failed,
then healed, with how long and how many appends were refused), `healthy` says which state it
is in, `wait_healthy()` waits for the heal, and `metrics()` carries `failed`, `failures`,
`heals`, `refused_records`. A cursor write that fails is logged at ERROR once (and once when a
later one succeeds), counted in `cursor_errors`, and retried on the next sync. Contract:
one event loop owns an AsyncWal; `close()` commits, resolves, persists the cursor and stops the
threads. Use as `async with await AsyncWal.open(dir, fsync="batch") as wal: ...`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from fluxrig.wal.errors import WalClosed, WalError, WalFailed, WalFull
from fluxrig.wal.log import DEFAULT_READ_MAX_BYTES, FSYNC_BATCH, Wal

__all__ = ["AsyncWal", "DEFAULT_CURSOR_SYNC_MS", "DEFAULT_HEAL_INTERVAL_S"]

log = logging.getLogger("fluxrig.wal")

#: How often (at most) acknowledged progress is written to wal.cursor.
DEFAULT_CURSOR_SYNC_MS = 200
#: While failed, the writer re-probes the filesystem this often (a statvfs and, once space
#: shows, one small write + fsync: cheap enough to notice freed space within a second).
DEFAULT_HEAL_INTERVAL_S = 1.0


class _Then:
    """A waiter of append_then: resolved like a future by _group_done, calls its function."""

    __slots__ = ("fn", "arg", "_done")

    def __init__(self, fn, arg):
        self.fn, self.arg, self._done = fn, arg, False

    def done(self) -> bool:
        return self._done

    def set_result(self, seq: int) -> None:
        self._done = True
        self._call(seq, None)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        self._call(None, exc)

    def _call(self, seq, exc) -> None:
        try:
            self.fn(self.arg, seq, exc)
        except Exception:  # noqa: BLE001 (one caller's bug must not stop the group's other waiters)
            log.exception("WAL append callback %r failed", self.fn)


class AsyncWal:
    """asyncio wrapper around a Wal (see the module docstring)."""

    def __init__(
        self,
        wal: Wal,
        *,
        cursor_sync_ms: float = DEFAULT_CURSOR_SYNC_MS,
        heal_interval: float = DEFAULT_HEAL_INTERVAL_S,
        name: str = "",
        _writer=None,
    ):
        self.wal = wal
        self.name = name or wal.directory
        self.cursor_sync = max(cursor_sync_ms, 0) / 1000.0
        self.heal_interval = max(0.01, float(heal_interval))
        self._next_heal = 0.0  # writer thread: monotonic time of the next heal attempt
        self._healthy: asyncio.Event | None = None
        self._failed_mono = 0.0
        self._cursor_failing = False
        self._writer = _writer or ThreadPoolExecutor(1, thread_name_prefix="fluxrig-wal-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fluxrig-wal-reader")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque = deque()  # (seq, future) of append_nowait, in seq order
        self._round: asyncio.Future | None = None  # resolved by the next group's callback
        # Shared with the writer thread, under _cond:
        self._cond = threading.Condition()
        self._cut = False  # ends a batch window early: close(), or a big backlog
        self._persist_due = False
        self._stop = False
        self._kick_pending = False  # loop thread only: a _kick is scheduled
        self._job: asyncio.Future | None = None  # the writer thread's loop
        self._last_cursor_sync = 0.0
        self._cursor_timer = None
        self._closing = False
        self.cursor_errors = 0
        self.last_error: BaseException | None = None

    @classmethod
    async def open(
        cls,
        directory: str,
        *,
        cursor_sync_ms: float = DEFAULT_CURSOR_SYNC_MS,
        heal_interval: float = DEFAULT_HEAL_INTERVAL_S,
        name: str = "",
        **options,
    ) -> AsyncWal:
        """Open (and recover) the Wal on the writer thread, then start the writer loop.
        Raises WalOpenFailed (a full disk, permissions), WalLocked, ConfigError."""
        writer = ThreadPoolExecutor(1, thread_name_prefix="fluxrig-wal-writer")
        loop = asyncio.get_running_loop()
        try:
            wal = await loop.run_in_executor(writer, partial(Wal, directory, **options))
        except BaseException:
            writer.shutdown(wait=False)
            raise
        self = cls(wal, cursor_sync_ms=cursor_sync_ms, heal_interval=heal_interval, name=name, _writer=writer)
        self.start()
        return self

    def start(self) -> None:
        if self._job is None:
            self._loop = asyncio.get_running_loop()
            self._healthy = asyncio.Event()
            self._healthy.set()
            self._job = self._loop.run_in_executor(self._writer, self._writer_loop)

    # -- appends --------------------------------------------------------------------------

    def _stage(self, payload) -> int:
        if self._closing:
            raise WalClosed(f"WAL {self.wal.directory} is closing")
        wal = self.wal
        seq = wal.stage(payload)
        if wal.pending_bytes * 2 >= wal.max_pending_bytes:
            with self._cond:
                self._cut = True
                self._cond.notify()
        elif not self._kick_pending:
            # One wake-up of the writer per loop iteration, after every appender made ready
            # in this one has staged: a notify per append hands the GIL to the writer after
            # the first record and splits the group (64 appenders: 3x fewer appends/s).
            self._kick_pending = True
            self._loop.call_soon(self._kick)
        return seq

    def _kick(self) -> None:
        self._kick_pending = False
        with self._cond:
            self._cond.notify()

    def append_nowait(self, payload) -> asyncio.Future:
        """Stage a record now; the future resolves with its seq once acknowledged per policy.
        Raises WalFull, RecordSizeError, WalFailed, WalClosed synchronously."""
        seq = self._stage(payload)
        fut = self._loop.create_future()
        self._waiters.append((seq, fut))
        return fut

    def append_then(self, payload, fn, arg) -> int:
        """Stage a record now; once acknowledged per policy, its group's callback calls
        `fn(arg, seq, None)` (or `fn(arg, None, error)`), in the loop, with no future or task
        per record: for callers that stage one record per message on a hot path. `fn` must not
        block. Returns the seq; raises like append_nowait."""
        seq = self._stage(payload)
        self._waiters.append((seq, _Then(fn, arg)))
        return seq

    async def append(self, payload) -> int:
        """Append and wait until acknowledged; returns the seq. Waits out WalFull."""
        while True:
            try:
                fut = self.append_nowait(payload)
                break
            except WalFull:
                await self._next_commit()
        return await fut

    async def flush(self) -> int:
        """Wait until everything appended so far is acknowledged; returns committed_seq."""
        wal = self.wal
        target = wal.next_seq - 1
        while wal.committed_seq < target and wal.failed is None and self._job is not None and not self._job.done():
            await self._next_commit()
        return wal.committed_seq

    @property
    def healthy(self) -> bool:
        """False while the Wal is failed (appends refused until it heals)."""
        return self.wal.failed is None

    async def wait_healthy(self, timeout: float | None) -> bool:
        """Wait until the Wal is not failed (healed), at most `timeout` s; True if healthy."""
        if self.wal.failed is None:
            return True
        if self._healthy is None or self._closing:
            return False
        self._healthy.clear()
        if self.wal.failed is None:
            return True
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout)
        except TimeoutError:
            pass
        return self.wal.failed is None

    async def wait_committed(self, after_seq: int, timeout: float | None = None) -> bool:
        """Wait until committed_seq > after_seq (new records for the shipper). False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.wal.committed_seq <= after_seq:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(self._next_commit_future()), remaining)
            except TimeoutError:
                return self.wal.committed_seq > after_seq
            if self._closing and self._job is not None and self._job.done():
                break
        return self.wal.committed_seq > after_seq

    def _next_commit_future(self) -> asyncio.Future:
        if self._round is None or self._round.done():
            self._round = self._loop.create_future()
        return self._round

    async def _next_commit(self) -> None:
        # shielded: one appender cancelled must not cancel the round the others wait on
        await asyncio.shield(self._next_commit_future())

    # -- reads and acks -------------------------------------------------------------------

    async def read_from(self, seq: int, max_n: int, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> list:
        """Committed records with seq >= `seq` (list of WalRecord), read off the loop."""
        return await self._loop.run_in_executor(self._reader, self.wal.read_from, seq, max_n, max_bytes)

    def ack(self, seq: int) -> int:
        """Acknowledge one record (memory only, cheap); returns the cursor."""
        cursor = self.wal.ack(seq)
        self._schedule_cursor_sync()
        return cursor

    def ack_range(self, first: int, last: int) -> int:
        """Acknowledge every record in [first, last] (one range, O(log n)); returns the cursor."""
        cursor = self.wal.ack_range(first, last)
        self._schedule_cursor_sync()
        return cursor

    def ack_many(self, seqs) -> int:
        cursor = self.wal.ack_many(seqs)
        self._schedule_cursor_sync()
        return cursor

    @property
    def cursor(self) -> int:
        return self.wal.cursor

    @property
    def committed_seq(self) -> int:
        return self.wal.committed_seq

    @property
    def recovery(self):
        return self.wal.recovery

    @property
    def wal_id(self) -> str:
        return self.wal.wal_id_hex

    def metrics(self) -> dict:
        m = self.wal.metrics()
        m["inflight_appends"] = m["next_seq"] - 1 - m["committed_seq"]  # staged, not yet acknowledged
        m["cursor_errors"] = self.cursor_errors
        m["healthy"] = m["failed"] is False
        return m

    def _schedule_cursor_sync(self) -> None:
        if self._cursor_timer is not None or self.wal.cursor == self.wal.persisted_cursor:
            return
        delay = max(self._last_cursor_sync + self.cursor_sync - time.monotonic(), 0.0)
        self._cursor_timer = self._loop.call_later(delay, self._cursor_due)

    def _cursor_due(self) -> None:
        self._cursor_timer = None
        with self._cond:
            self._persist_due = True
            self._cond.notify()

    # -- the writer thread ----------------------------------------------------------------

    def _writer_loop(self) -> None:
        """Runs on the writer thread until close(): commit groups, persist the cursor."""
        wal = self.wal
        cond = self._cond
        while True:
            with cond:
                while True:
                    if self._stop:
                        break
                    if wal.failed is not None:  # refused appends stage nothing: wait to re-probe
                        delay = self._next_heal - time.monotonic()
                        if delay <= 0 or self._persist_due:
                            break
                        cond.wait(delay)
                        continue
                    if wal.pending_records:
                        if wal.fsync != FSYNC_BATCH or self._cut:
                            break
                        first = wal.first_staged_at
                        delay = wal.batch_window - (time.monotonic() - first) if first is not None else 0.0
                        if delay <= 0:
                            break
                        cond.wait(delay)
                        continue
                    if self._persist_due:
                        break
                    cond.wait()
                self._cut = False
                stop = self._stop
                persist = self._persist_due or stop
                self._persist_due = False
            if wal.failed is not None and not stop and time.monotonic() >= self._next_heal:
                if wal.heal():
                    self._post(self._health_changed, None)
                else:
                    self._next_heal = time.monotonic() + self.heal_interval
            if wal.pending_records:
                try:
                    committed = wal.commit()
                except BaseException as exc:  # WalFailed: what it did not write fails with it
                    self._next_heal = time.monotonic() + self.heal_interval
                    self._post(self._group_done, exc)
                    if isinstance(exc, WalFailed):
                        self._post(self._health_changed, exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    self._post(self._group_done, committed)
            if persist and wal.cursor != wal.persisted_cursor:
                try:
                    wal.persist_cursor()
                    error = None
                except WalError as exc:
                    error = exc
                self._post(self._persist_done, error)
            if stop and (wal.failed is not None or not wal.pending_records):
                return

    def _post(self, callback, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _group_done(self, outcome) -> None:
        """In the loop: one call per commit group; wakes every append it covers."""
        waiters = self._waiters
        if isinstance(outcome, BaseException):
            self.last_error = outcome
            # Records the group wrote before the failure stand (WalFailed.committed): their
            # appends succeeded. The rest were never written and never will be: they fail.
            committed = getattr(outcome, "committed", None)
            while committed is not None and waiters and waiters[0][0] <= committed:
                seq, fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(seq)
            self._waiters = deque()
            for _seq, fut in waiters:
                if not fut.done():
                    fut.set_exception(outcome)
        else:
            while waiters and waiters[0][0] <= outcome:
                seq, fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(seq)
        self._end_round()

    def _end_round(self) -> None:
        # Wake whoever waits for "a commit happened"; they re-check committed_seq themselves.
        round_fut, self._round = self._round, None
        if round_fut is not None and not round_fut.done():
            round_fut.set_result(None)

    def _health_changed(self, failure) -> None:
        """In the loop: the Wal failed (`failure`, a WalFailed) or healed (None). One ERROR
        line per change of state, never one per refused append."""
        m = self.wal.metrics()
        if failure is not None:
            if self._failed_mono:
                return  # already reported (a heal raced with a new failure: reported below)
            self._failed_mono = time.monotonic()
            log.error(
                "WAL %s failed (%s: %s): appends are refused until space returns; re-probing every %gs",
                self.name, failure.op, getattr(failure.cause, "strerror", None) or failure.cause, self.heal_interval,
            )  # fmt: skip
            if self._healthy is not None:
                self._healthy.clear()
            return
        if not self._failed_mono:
            return
        took = time.monotonic() - self._failed_mono
        self._failed_mono = 0.0
        log.error(
            "WAL %s healed after %.1fs: writable again at seq %d (%d appends refused while failed)",
            self.name, took, m["next_seq"], m["refused_records"],
        )  # fmt: skip
        if self._healthy is not None:
            self._healthy.set()

    def _persist_done(self, error) -> None:
        self._last_cursor_sync = time.monotonic()
        if error is not None:
            self.cursor_errors += 1
            self.last_error = error
            if not self._cursor_failing:
                self._cursor_failing = True
                log.error("WAL %s: cannot persist its cursor (%s); retried at every sync, acknowledged segments "
                          "are kept until it succeeds", self.name, error)  # fmt: skip
        elif self._cursor_failing:
            self._cursor_failing = False
            log.error("WAL %s: cursor persisted again (%d failed attempts so far)", self.name, self.cursor_errors)
        if self.wal.cursor != self.wal.persisted_cursor and not self._closing:
            self._schedule_cursor_sync()

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is staged, resolve its appends, persist the cursor, close the Wal."""
        if self._closing and self._job is None:
            return
        self._closing = True
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
            self._cursor_timer = None
        with self._cond:
            self._stop = self._cut = True
            self._cond.notify()
        if self._job is not None:
            try:
                await self._job
            finally:
                self._job = None
        await asyncio.sleep(0)  # the writer's last callbacks run before the rest fail
        for _seq, fut in self._waiters:
            if not fut.done():
                fut.set_exception(WalClosed(f"WAL {self.wal.directory} closed before commit"))
        self._waiters.clear()
        self._end_round()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self.wal.close)
        finally:
            self._writer.shutdown(wait=True)
            self._reader.shutdown(wait=True)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
