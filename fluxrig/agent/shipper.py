"""TelemetryShipper: the Rack's WAL -> `flux.telemetry.<rack>.<kind>` on JetStream, at least
once, deduplicated at the Mixer, never losing what the WAL acknowledged.

Record convention. The runtime appends telemetry to its AsyncWal as CBOR maps
`{"kind": "logs"|"metrics"|"traces", <the kind's columns>}` (columns in
fluxrig.agent.telemetry.COLUMNS; `ts`/`start`/`end` in unix ns; `attrs` a dict or JSON text;
a span's own kind, since `kind` is taken, goes in `span_kind`).
The WAL seq is the record's dedup id and the WAL id its source incarnation.

Loop. Read up to `batch_records` committed records after the last shipped seq, group them by
kind (order kept within a kind), publish one columnar batch per kind with
`Nats-Msg-Id = <wal_id>-<kind>-<first>-<last>`, and only when every batch of the read is
acknowledged by JetStream (on disk, `sync_interval: always`) ack the records in the WAL, which
may then delete their segment. A failed publish is retried from the same seq after
`retry_wait`: the Mixer drops what it already stored, so a retry can duplicate nothing.
Records that do not decode are counted and acknowledged (they never will decode).

It ships only while the agent is connected and its passport allows telemetry (active or
offline); pending and suspended Racks keep their telemetry in the WAL. `rate` (records/s)
bounds the drain speed after an outage so a backlog does not swamp the Snake.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..aiotools import cancel_and_wait
from ..errors import FluxError
from .telemetry import COLUMNS, MAX_BATCH_RECORDS, batch_msg_id, encode_batch

__all__ = ["TelemetryShipper", "SHIPPABLE_STATUSES"]

log = logging.getLogger("fluxrig.agent.shipper")

SHIPPABLE_STATUSES = ("active", "offline")
DEFAULT_BATCH_RECORDS = 1000
DEFAULT_MAX_BYTES = 1 << 20


class TelemetryShipper:
    def __init__(
        self,
        wal,
        agent,
        *,
        batch_records: int = DEFAULT_BATCH_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        rate: float | None = None,
        idle_wait: float = 0.5,
        retry_wait: float = 1.0,
        publish_timeout: float = 5.0,
    ):
        if not 0 < batch_records <= MAX_BATCH_RECORDS:
            raise ValueError(f"batch_records must be in 1..{MAX_BATCH_RECORDS}")
        self.wal = wal
        self.agent = agent
        self.batch_records = batch_records
        self.max_bytes = max_bytes
        self.rate = rate
        self.idle_wait = idle_wait
        self.retry_wait = retry_wait
        self.publish_timeout = publish_timeout
        self.shipped = 0
        self.batches = 0
        self.undecodable = 0
        self.publish_failures = 0
        self.last_error = ""
        self._next_seq = 0
        self._task: asyncio.Task | None = None

    @property
    def stats(self) -> dict:
        return {
            "shipped": self.shipped,
            "batches": self.batches,
            "undecodable": self.undecodable,
            "publish_failures": self.publish_failures,
            "backlog": max(0, self.wal.committed_seq - self.wal.cursor),
            "last_error": self.last_error,
        }

    async def start(self) -> None:
        self._next_seq = self.wal.cursor + 1
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-shipper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def _can_ship(self) -> bool:
        a = self.agent
        return a.connected.is_set() and a.passport is not None and a.passport.status in SHIPPABLE_STATUSES

    async def _run(self) -> None:
        while True:
            if not self._can_ship():
                await asyncio.sleep(self.idle_wait)
                continue
            records = await self.wal.read_from(self._next_seq, self.batch_records, self.max_bytes)
            if not records:
                await self.wal.wait_committed(self._next_seq - 1, timeout=self.idle_wait)
                continue
            started = time.monotonic()
            try:
                await self.ship(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.publish_failures += 1
                self.last_error = str(exc)[:500]
                log.debug("telemetry publish failed, retrying from seq %d: %s", self._next_seq, exc)
                await asyncio.sleep(self.retry_wait)
                continue
            if self.rate:
                pause = len(records) / self.rate - (time.monotonic() - started)
                if pause > 0:
                    await asyncio.sleep(pause)

    async def ship(self, records) -> None:
        """Publish one read of WAL records and, when all are acknowledged, ack them in the WAL."""
        rack = self.agent.rack_name
        if not rack:
            raise FluxError("no rack name yet (not enrolled)")
        groups: dict[str, list[dict]] = {}
        for r in records:
            try:
                body = r.decode()
                kind = body.get("kind")
                if kind not in COLUMNS:
                    raise ValueError(f"unknown kind {kind!r}")
            except Exception:
                self.undecodable += 1
                continue
            row = {c: body.get(c) for c in COLUMNS[kind]}
            if kind == "traces":  # "kind" names the record type here; the span's kind is span_kind
                row["kind"] = body.get("span_kind")
            row["id"] = r.seq
            groups.setdefault(kind, []).append(row)
        src = self.wal.wal_id
        for kind, rows in groups.items():
            data = encode_batch(kind, rack, rows, src=src)
            msg_id = f"{src}-" + batch_msg_id(rack, kind, rows[0]["id"], len(rows))
            await self.agent.publish_telemetry(kind, data, msg_id=msg_id, timeout=self.publish_timeout, src=src)
            self.batches += 1
        self.wal.ack_many(r.seq for r in records)
        self.shipped += sum(len(v) for v in groups.values())
        self._next_seq = records[-1].seq + 1
