"""The sending half of the guaranteed lane (fluxrig/agent/lanes.py, JetStreamBus).

`outbound(subject).put(msg)` appends the record `[subject, dedup id, msg CBOR]` to the lane WAL
and returns once it is durable; the backlog cap (`max_backlog_bytes`) makes `put` wait up to
`send_timeout` for the pump, then raise LaneFull; a failed lane WAL (a full disk) is waited for
the same way, then WalFailed. A lane WAL that could not be opened at all (WalOpenFailed) does
not stop the Rack (issue 13): `JetStreamBus.open` returns a bus that receives as usual, refuses
sends with that error after `send_timeout`, and opens the WAL again every `wal_reopen_interval`
(one ERROR when it fails, one when it opens; `storage_failed` in the metrics meanwhile).
`SendingSide` is a mixin of JetStreamBus: it uses the bus's `wal`, `publisher`, `m`,
`send_timeout`, `max_backlog_bytes` and `_closing`, and nothing else of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import cbor2

from ..errors import LaneFull
from ..msg import FluxMsg
from ..runtime.bus import OutboundTarget, dedup_id
from ..wal.errors import WalClosed, WalError, WalFailed, WalOpenFailed
from ..wire.batch import record_overhead
from .lane_codec import LaneCodec
from .publisher import WalPublisher
from .session import SnakeSession

if TYPE_CHECKING:
    from .lanes import JetStreamBus

__all__ = ["SendingSide", "WAL_REOPEN_S"]

log = logging.getLogger("fluxrig.agent.lanes")

WAL_REOPEN_S = 5.0  # a lane WAL that did not open is tried again this often

#: The pump's metrics, zero while the lane WAL is not open.
_PUMP_METRICS = ("published", "batches_published", "records_per_batch", "publish_failures", "foreign_dropped",
                 "migrated", "parked_failures", "quota_rejections", "quota_full", "undecodable_records", "window",
                 "rtt_ms", "backlog_records", "inflight", "inflight_batches")  # fmt: skip


class _Outbound(OutboundTarget):
    """The target for one subject: `put` appends to the lane WAL and returns when durable
    (durable in the lane WAL counts as delivered for a drain: the pump ships it later)."""

    batches = True  # put_many: one lane-WAL commit for the batch

    async def put(self, msg: FluxMsg) -> None:
        await self.bus.append(self.subject, msg)

    async def put_many(self, msgs: list[FluxMsg]) -> None:
        await self.bus.append_many(self.subject, msgs)


class SendingSide:
    """JetStreamBus's sending half (see the module docstring)."""

    @classmethod
    async def open(cls, session: SnakeSession, open_wal, **kw) -> JetStreamBus:
        """A bus over the lane WAL `open_wal()` opens. If it cannot (WalOpenFailed: a full disk)
        the bus still receives, `put` waits up to `send_timeout` then raises that error, and
        the WAL is retried every `wal_reopen_interval` (one ERROR when failed, one when open)."""
        try:
            wal = await open_wal()
        except WalOpenFailed as exc:
            bus = cls(session, None, open_wal=open_wal, **kw)
            bus.wal_open_error = exc
            log.error("lane WAL not opened (%s): the guaranteed lane receives but cannot send; retrying every %gs",
                      exc, bus.wal_reopen_interval)  # fmt: skip
            return bus
        return cls(session, wal, open_wal=open_wal, **kw)

    def _attach(self, wal) -> None:
        self.wal = wal
        self.publisher = WalPublisher(wal, self.session, LaneCodec(), **self._pump)
        wm = wal.metrics()
        self._backlog_base = int(wm.get("size_bytes") or 0) if wm.get("unacked_records") else 0
        self._wal_ready.set()

    async def _reopen_wal(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not self._closing:
            await asyncio.sleep(self.wal_reopen_interval)
            try:
                wal = await self._open_wal()
            except WalOpenFailed as exc:
                self.wal_open_error = exc
                continue
            if self._closing:
                await wal.close()
                return
            self.wal_open_error = None
            self._attach(wal)
            self.publisher.start()
            log.error("lane WAL opened after %.0fs: the guaranteed lane sends again", loop.time() - t0)
            return

    def _backlog_bytes(self) -> int:
        if self.publisher is None:
            return 0
        return max(0, self._backlog_base + self._appended_bytes - self.publisher.acked_bytes)

    async def append(self, subject: str, msg: FluxMsg) -> None:
        """Encode and append to the lane WAL; return once durable (LaneFull past the backlog
        cap). While the lane WAL is failed (a full disk) it waits up to `send_timeout` for it
        to heal, then raises WalFailed: the emitter is held back, the message is not lost in
        between (a record the failure refused was never written; it is appended again)."""
        await self._ready_to_append(subject)
        await self._append_record(*self._encode(subject, msg))
        self.m["appended"] += 1

    async def append_many(self, subject: str, msgs: list[FluxMsg]) -> None:
        """`append` each of `msgs`, in order, made durable together: every record is staged
        before the first is awaited, so the batch shares one group commit (one fsync) instead
        of waiting one commit per message. The backlog cap is checked once for the batch. A
        record the WAL refused (full, failed) and every one after it goes again through
        `append`'s path one by one, in order; a group that fails fails every record staged
        after the last one it wrote, so the retried ones are a suffix and order is kept."""
        if len(msgs) == 1:
            await self.append(subject, msgs[0])
            return
        await self._ready_to_append(subject)
        encoded = [self._encode(subject, m) for m in msgs]
        wal = self.wal
        staged: list[asyncio.Future] = []
        for record, size in encoded:
            try:
                staged.append(wal.append_nowait(record))
            except WalError:  # full, failed, closed, too big: the one-by-one path says which
                break
            self._appended_bytes += size
        first_retry = len(staged)
        if staged:
            try:
                await staged[-1]  # the WAL resolves its waiters in seq order: all are done
            except asyncio.CancelledError:
                for fut in staged:
                    fut.cancel()
                raise
            except WalError:
                pass
            error = None
            for i, fut in enumerate(staged):
                exc = fut.exception()
                if exc is None:
                    continue
                self._appended_bytes -= encoded[i][1]
                first_retry = min(first_retry, i)
                if not isinstance(exc, WalFailed):
                    error = error or exc
            if error is not None:
                raise error
        self.m["appended"] += first_retry
        for record, size in encoded[first_retry:]:
            await self._append_record(record, size)
            self.m["appended"] += 1

    async def _ready_to_append(self, subject: str) -> None:
        if self.wal is None:
            await self._wait_wal_open()
        cap = self.max_backlog_bytes
        if cap is not None and self._backlog_bytes() >= cap:
            await self._wait_room(subject, cap)

    @staticmethod
    def _encode(subject: str, msg: FluxMsg) -> tuple[bytes, int]:
        """The lane WAL record of `msg` and its size as the pump counts it when acked."""
        rid = dedup_id(msg, subject)
        body = msg.to_cbor()
        return cbor2.dumps([subject, rid, body]), len(body) + record_overhead(rid)

    async def _append_record(self, record: bytes, size: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            # Counted as the pump counts it when acked (LaneCodec's Entry size), so the two cancel.
            self._appended_bytes += size
            try:
                await self.wal.append(record)
            except WalFailed:
                self._appended_bytes -= size
                deadline = deadline or loop.time() + self.send_timeout
                remaining = deadline - loop.time()
                self.m["storage_waits"] += 1
                if remaining <= 0 or not await self.wal.wait_healthy(remaining):
                    self.m["storage_refused"] += 1
                    raise
                continue
            break

    async def _wait_wal_open(self) -> None:
        """The lane WAL did not open: wait up to `send_timeout` for the retry to open it,
        then refuse with why (the emitter's error convention, as for a failed WAL)."""
        self.m["storage_waits"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wal_ready.wait(), self.send_timeout)
        if self.wal is None:
            self.m["storage_refused"] += 1
            exc = self.wal_open_error
            raise WalOpenFailed(exc.path, exc.cause) if exc is not None else WalClosed("lane WAL is not open")

    async def _wait_room(self, subject: str, cap: int) -> None:
        self.m["backlog_waits"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.send_timeout
        while self._backlog_bytes() >= cap:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.m["lane_full"] += 1
                raise LaneFull(
                    f"guaranteed lane {subject}: {self._backlog_bytes()} bytes wait for the Snake "
                    f"(cap {cap}); nothing published for {self.send_timeout:g}s"
                )
            await self.publisher.wait_progress(remaining)
