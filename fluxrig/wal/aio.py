"""asyncio front of the WAL: group commit from one writer thread, futures resolved when durable.

Job: let the event loop append without ever touching the disk. `append_nowait(payload)` stages
the record (encoding and CRC in the loop thread, no I/O) and returns a future; one committer
task hands every staged record to `Wal.commit()` on a single dedicated executor thread, which
writes them in one `write` and one fdatasync, then resolves each future with its seq. So the
future resolves exactly when the record is acknowledged per the policy (see fluxrig/wal/log.py):

* `always` -- the committer starts a commit as soon as a record is staged; records staged while
  that fsync runs go in the next one (group commit: N concurrent appenders, ~1 fsync per round).
* `batch` -- the committer waits out the window, counted from the first staged record, then
  commits everything staged; it cuts the wait short once half of `max_pending_bytes` is staged,
  so a burst is written in big batches instead of being refused.
* `never` -- like `always`, without the fsync.

Reads (`read_from`) run on a second executor thread, so a long fsync never delays the shipper's
reads, and vice versa. Acks are applied in the loop thread (memory only); the cursor is
persisted from the writer thread at most every `cursor_sync_ms` and on close.

Backpressure: `append_nowait` raises WalFull when more than `max_pending_bytes` are staged (the
caller counts the drop); `append` waits for the running commit and retries instead.

A commit that fails (WalFailed) fails every outstanding future; the Wal stays failed. Contract:
one event loop owns an AsyncWal; `close()` commits, resolves, persists the cursor and stops the
threads. Use as `async with await AsyncWal.open(dir, fsync="batch") as wal: ...`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from fluxrig.wal.errors import WalClosed, WalError, WalFull
from fluxrig.wal.log import DEFAULT_READ_MAX_BYTES, FSYNC_BATCH, Wal

__all__ = ["AsyncWal", "DEFAULT_CURSOR_SYNC_MS"]

#: How often (at most) acknowledged progress is written to wal.cursor.
DEFAULT_CURSOR_SYNC_MS = 200


class AsyncWal:
    """asyncio wrapper around a Wal (see the module docstring)."""

    def __init__(self, wal: Wal, *, cursor_sync_ms: float = DEFAULT_CURSOR_SYNC_MS, _writer=None):
        self.wal = wal
        self.cursor_sync = max(cursor_sync_ms, 0) / 1000.0
        self._writer = _writer or ThreadPoolExecutor(1, thread_name_prefix="fluxrig-wal-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fluxrig-wal-reader")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque = deque()  # (seq, future) in seq order
        self._wake = asyncio.Event()
        self._cut = asyncio.Event()  # ends a batch window early: close(), or a big backlog
        self._commit_round: asyncio.Future | None = None
        self._last_cursor_sync = 0.0
        self._cursor_timer = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.cursor_errors = 0
        self.last_error: BaseException | None = None

    @classmethod
    async def open(cls, directory: str, *, cursor_sync_ms: float = DEFAULT_CURSOR_SYNC_MS, **options) -> "AsyncWal":
        """Open (and recover) the Wal on the writer thread, then start the committer."""
        writer = ThreadPoolExecutor(1, thread_name_prefix="fluxrig-wal-writer")
        loop = asyncio.get_running_loop()
        try:
            wal = await loop.run_in_executor(writer, partial(Wal, directory, **options))
        except BaseException:
            writer.shutdown(wait=False)
            raise
        self = cls(wal, cursor_sync_ms=cursor_sync_ms, _writer=writer)
        self.start()
        return self

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="fluxrig-wal-committer")

    # -- appends --------------------------------------------------------------------------

    def append_nowait(self, payload) -> asyncio.Future:
        """Stage a record now; the future resolves with its seq once acknowledged per policy.
        Raises WalFull, RecordSizeError, WalFailed, WalClosed synchronously."""
        if self._closing:
            raise WalClosed(f"WAL {self.wal.directory} is closing")
        wal = self.wal
        seq = wal.stage(payload)
        fut = self._loop.create_future()
        self._waiters.append((seq, fut))
        self._wake.set()
        if wal.pending_bytes * 2 >= wal.max_pending_bytes:
            self._cut.set()
        return fut

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
        if self._waiters:
            await asyncio.shield(self._waiters[-1][1])
        return self.wal.committed_seq

    async def wait_committed(self, after_seq: int, timeout: float | None = None) -> bool:
        """Wait until committed_seq > after_seq (new records for the shipper). False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.wal.committed_seq <= after_seq:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(self._next_commit_future()), remaining)
            except asyncio.TimeoutError:
                return self.wal.committed_seq > after_seq
            if self._closing and self._task is not None and self._task.done():
                break
        return self.wal.committed_seq > after_seq

    def _next_commit_future(self) -> asyncio.Future:
        if self._commit_round is None or self._commit_round.done():
            self._commit_round = self._loop.create_future()
        return self._commit_round

    async def _next_commit(self) -> None:
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
        m["inflight_appends"] = len(self._waiters)
        m["cursor_errors"] = self.cursor_errors
        return m

    def _schedule_cursor_sync(self) -> None:
        if self._cursor_timer is not None or self.wal.cursor == self.wal.persisted_cursor:
            return
        delay = max(self._last_cursor_sync + self.cursor_sync - time.monotonic(), 0.0)
        self._cursor_timer = self._loop.call_later(delay, self._cursor_due)

    def _cursor_due(self) -> None:
        self._cursor_timer = None
        self._wake.set()

    # -- the committer --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = self._loop
        wal = self.wal
        while True:
            await self._wake.wait()
            self._wake.clear()
            if wal.pending_records:
                if wal.fsync == FSYNC_BATCH and not self._closing:
                    first = wal.first_staged_at
                    delay = wal.batch_window - (time.monotonic() - first) if first is not None else 0.0
                    if delay > 0 and not self._cut.is_set():
                        try:
                            await asyncio.wait_for(self._cut.wait(), delay)
                        except asyncio.TimeoutError:
                            pass
                if not self._closing:
                    self._cut.clear()
                await self._commit(loop)
            if wal.cursor != wal.persisted_cursor and (
                self._closing or time.monotonic() - self._last_cursor_sync >= self.cursor_sync
            ):
                await self._persist(loop)
            elif wal.cursor != wal.persisted_cursor:
                self._schedule_cursor_sync()
            if self._closing and (wal.failed is not None or not (wal.pending_records or self._waiters)):
                return

    async def _commit(self, loop) -> None:
        try:
            committed = await loop.run_in_executor(self._writer, self.wal.commit)
        except BaseException as exc:  # WalFailed: everything outstanding fails with it
            self.last_error = exc
            waiters, self._waiters = self._waiters, deque()
            for _seq, fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
            self._end_round()
            if not isinstance(exc, Exception):
                raise
            return
        waiters = self._waiters
        while waiters and waiters[0][0] <= committed:
            _seq, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(_seq)
        self._end_round()

    def _end_round(self) -> None:
        # Wake whoever waits for "a commit happened"; they re-check committed_seq themselves.
        round_fut, self._commit_round = self._commit_round, None
        if round_fut is not None and not round_fut.done():
            round_fut.set_result(None)

    async def _persist(self, loop) -> None:
        try:
            await loop.run_in_executor(self._writer, self.wal.persist_cursor)
        except WalError as exc:
            self.cursor_errors += 1
            self.last_error = exc
        self._last_cursor_sync = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is staged, resolve its futures, persist the cursor, close the Wal."""
        if self._closing and self._task is None:
            return
        self._closing = True
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
            self._cursor_timer = None
        self._cut.set()
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            finally:
                self._task = None
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
