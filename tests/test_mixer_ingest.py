"""Telemetry ingest (fluxrig_mixer.ingest): the hand-off of new (rack, src) -> incarnation
assignments from the event loop, which decodes fetches, to the writer thread, which stores
them in `telemetry_sources` next to the rows that use them.

Why it matters: a Mixer that restarts reads its incarnation numbers back from that table. A
pair the writer never stored comes back with no number, so the Rack's next batch from that
WAL gets a fresh incarnation (its re-sent records are stored twice), and the rack's numbering
restarts below one already in use (records of another WAL collide with stored ids and are
dropped as re-sends).

Real DuckDB file, real asyncio loop, the writer in `asyncio.to_thread` as in production, real
nats-py message objects (no bus: the hand-off is what is tested).
"""

from __future__ import annotations

import asyncio
import json
import threading

import duckdb
from fluxrig_mixer.ingest import TelemetryIngest
from fluxrig_mixer.registry import Database
from nats.aio.msg import Msg

from fluxrig.wire.telemetry import SRC_HEADER

RACKS = 7
# Decoded fetches that may already be in flight when the table goes away: the writer's queue
# (ingest.PIPELINE_DEPTH = 2) plus the write in progress. Writes beyond these carry sources
# that were decoded while the table was away, so old code lost at least two of them.
IN_FLIGHT = 3
FAILED_WRITES = IN_FLIGHT + 3
MAX_MESSAGES = 5000


def _msg(rack: str, src: str, record_id: int) -> Msg:
    line = json.dumps({"id": record_id, "ts": 1, "severity": 9, "body": f"{src} {record_id}"}).encode() + b"\n"
    return Msg(_client=None, subject=f"flux.telemetry.{rack}.logs", data=line, headers={SRC_HEADER: src})


def _stored_sources(db: Database) -> dict[tuple[str, str], int]:
    rows = db.conn.execute("SELECT rack, src, incarnation FROM telemetry_sources").fetchall()
    return {(rack, src): inc for rack, src, inc in rows}


async def _rename(db: Database, old: str, new: str) -> None:
    """ALTER TABLE from the loop (the owner's connection) while the writer thread works; a
    catalog conflict with a write in progress is retried."""
    for _ in range(200):
        try:
            db.conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
            return
        except duckdb.Error:
            await asyncio.sleep(0.005)
    raise AssertionError(f"could not rename {old} to {new}")


async def test_new_sources_survive_failed_writes_while_the_loop_keeps_decoding(tmp_path):
    """The loop decodes a fetch from a new WAL (a new source) at every step while the writer
    thread stores the previous ones; for a while the store refuses every write (the sources
    table is away). Afterwards every (rack, src) keeps the incarnation the loop gave it, in
    the table and in a restarted ingest. Before the hand-off was made safe, a failed write
    dropped the assignments it had taken from the shared list: they were never stored."""
    db = Database(str(tmp_path / "mixer.duckdb"))
    ingest = TelemetryIngest(db, spool_dir=str(tmp_path))
    queue: asyncio.Queue = asyncio.Queue(2)
    failures = 0
    writes = 0

    async def writer() -> None:
        nonlocal failures, writes
        while (groups := await queue.get()) is not None:
            try:
                await asyncio.to_thread(ingest._write_groups, groups)
                writes += 1
            except duckdb.Error:
                failures += 1

    seq = 0

    async def decode_one() -> None:
        nonlocal seq
        seq += 1
        await queue.put(ingest._decode([_msg(f"r{seq % RACKS}", f"wal-{seq}", 1)]))

    task = asyncio.get_running_loop().create_task(writer())
    try:
        while writes < 50:  # the store works
            await decode_one()
        await _rename(db, "telemetry_sources", "telemetry_sources_away")
        while failures < FAILED_WRITES and seq < MAX_MESSAGES:  # the store refuses writes
            await decode_one()
        assert failures >= FAILED_WRITES, f"only {failures} writes failed in {seq} fetches"
        await _rename(db, "telemetry_sources_away", "telemetry_sources")
        ok_before = writes
        while writes < ok_before + 50:  # the store works again
            await decode_one()
    finally:
        await queue.put(None)
        await task
    await asyncio.to_thread(ingest._write_groups, {})  # the writer's next fetch, however small

    assert len(ingest._sources) == seq
    stored = _stored_sources(db)
    lost = sorted(k for k, inc in ingest._sources.items() if stored.get(k) != inc)
    assert not lost, f"{len(lost)} of {seq} source assignments never reached telemetry_sources: {lost[:5]}"
    reopened = TelemetryIngest(db, spool_dir=str(tmp_path))  # what a restarted Mixer knows
    assert reopened._sources == ingest._sources
    for rack, nxt in ingest._next_incarnation.items():
        assert reopened._next_incarnation[rack] == nxt, f"{rack}: numbering would reuse an incarnation"
    db.close()


def test_pending_sources_hand_off_loses_and_repeats_nothing_between_threads():
    """put() from one thread while another takes and gives back (a failed write) at random:
    what is finally taken is exactly what was put, each once, in order."""
    from fluxrig_mixer.ingest import PendingSources

    pending = PendingSources()
    total = 20000
    taken: list[tuple[str, str, int]] = []
    done = threading.Event()

    def writer() -> None:
        n = 0
        while not done.is_set() or len(pending):
            items = pending.take()
            n += 1
            if items and n % 3 == 0:
                pending.give_back(items)  # this write failed: the next one stores them first
            else:
                taken.extend(items)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(total):
            pending.put(("r", f"s{i}", i))
    finally:
        done.set()
        t.join(30)
    assert not t.is_alive()
    assert [item[2] for item in taken] == list(range(total))
