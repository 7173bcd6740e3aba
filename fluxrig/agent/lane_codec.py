"""The guaranteed lane's WAL side, Rack-side: where the lane WAL lives, what its records are,
and how they become JetStream batches. Used by fluxrig/agent/lanes.py (JetStreamBus), which
tells the whole story of the lane.

* `open_lane_wal(config)`: the AsyncWal at `<store_dir>/lanes` (fsync policy below).
* A lane-WAL record is the CBOR array `[subject, dedup id, FluxMsg CBOR]`, appended by
  `JetStreamBus.append` and shipped by the pump (fluxrig/agent/publisher.py) through
  `LaneCodec`: records -> batches of fluxrig.wire.batch, one subject per batch, with a
  `Nats-Msg-Id` derived from the WAL id and the batch's seqs.
* A Rack renamed keeps its lane WAL: a record queued under the former name
  (`flux.msg.<old>.<gear>.<port>`) is sent on the same gear and port under the current name
  (the subject the receivers' consumers filter once the Mixer re-projected the scenario); its
  record id is kept, so a receiver that already had it masks it. `migrated` counts them; each
  former subject is logged once. A record that does not decode is UNDECODABLE, one whose
  subject is no lane subject FOREIGN: the pump parks, logs and counts both before acking.

Pure: no I/O in LaneCodec (the logging aside).
"""

from __future__ import annotations

import logging
import os

import cbor2

from ..wire import subjects as S
from ..wire.batch import batch_msg_id, encode_lane_batch, record_overhead
from .pump import Batch, DropReason, Entry, Pacing, PumpLimits

__all__ = [
    "LaneCodec",
    "open_lane_wal",
    "LANE_WAL_DIR",
    "LANE_LIMITS",
    "LANE_PACING",
    "LANE_FSYNC",
    "MSG_ID_HEADER",
]

log = logging.getLogger("fluxrig.agent.lanes")

LANE_WAL_DIR = "lanes"
#: Batches of at most 512 records / 1 MiB, up to 16 MiB unacknowledged.
LANE_LIMITS = PumpLimits(max_batch_records=512, max_batch_bytes=1 << 20, max_inflight_bytes=16 << 20)
#: The lane's window: from one batch in flight (records arriving meanwhile make the next
#: batch: the fewer publishes, the more records each carries), growing only while full
#: batches wait; no loop-lag signal (lane records are live traffic, not a backlog to slow
#: down); a round-trip budget that only a Snake in trouble exceeds.
LANE_PACING = Pacing(initial_window=1.0, min_window=1.0, max_window=32, rtt_budget=1.0, lag_budget=0.0)
MSG_ID_HEADER = "Nats-Msg-Id"
#: store.wal_fsync -> the lane WAL's policy (see open_lane_wal).
LANE_FSYNC = {"always": "always", "batch": "always", "never": "never"}


async def open_lane_wal(config, fsync: str | None = None):
    """The lane WAL for a Rack's fluxrig Config: `<store_dir>/lanes`, no size cap in the WAL
    itself (JetStreamBus applies `store.wal_max_size_mb` as backpressure), and the fsync policy
    `LANE_FSYNC[store.wal_fsync]` unless `fsync` names one.

    Why `batch` becomes `always` here: every lane append is awaited by its emitter, so under
    `batch` each emitter would wait out the whole window per message (20 msg/s per emitter at
    50 ms: measured, bench/guaranteed_lane.py). `always` keeps the same promise (fdatasync
    before the append is acknowledged) and already shares one fdatasync among the appends
    that arrive while one runs (group commit). `never` stays `never` (no fsync: the operator
    chose to trust the page cache)."""
    from ..wal import AsyncWal
    from ..wal.log import options_from_config

    options = options_from_config(config)
    options["max_size_bytes"] = None
    options["fsync"] = fsync or LANE_FSYNC.get(options["fsync"], options["fsync"])
    return await AsyncWal.open(os.path.join(config.store_dir, LANE_WAL_DIR), **options)


class LaneCodec:
    """Lane-WAL records <-> batches (fluxrig.wire.batch); pure. A record queued under a former
    name of this Rack is moved to the same gear and port under the current name (`migrated`,
    logged once per former subject); one whose subject is no lane subject is FOREIGN."""

    def __init__(self):
        self._warned: set[str] = set()
        self._moved: dict[tuple[str, str], str] = {}
        self.migrated = 0

    def parse(self, seq: int, payload: bytes, rack: str) -> Entry | DropReason:
        try:
            subject, rid, body = cbor2.loads(payload)
            if type(subject) is not str or type(rid) is not str or type(body) is not bytes:
                raise TypeError("not [subject, id, body]")
        except Exception:
            return DropReason.UNDECODABLE
        if S.rack_of_subject(subject) != rack:
            moved = self._migrate(subject, rack)
            if moved is None:
                return DropReason.FOREIGN
            subject = moved
            self.migrated += 1
        return Entry(seq, subject, len(body) + record_overhead(rid), (rid, body))

    def _migrate(self, subject: str, rack: str) -> str | None:
        key = (subject, rack)
        moved = self._moved.get(key)
        if moved is not None:
            return moved
        parts = subject.split(".")
        if len(parts) != 5 or parts[:2] != ["flux", "msg"] or not rack:
            return None
        try:
            moved = S.msg(rack, parts[3], parts[4])
        except Exception:  # a gear or port name the subject rules refuse
            return None
        if len(self._moved) < 1000:
            self._moved[key] = moved
        log.warning("guaranteed lane: records queued as %s (a former name of this rack) are sent as %s",
                    subject, moved)  # fmt: skip
        return moved

    def encode(self, batch: Batch, rack: str, wal_id: str) -> tuple[bytes, dict[str, str]]:
        payload = encode_lane_batch([e.item for e in batch.entries])
        return payload, {MSG_ID_HEADER: batch_msg_id(wal_id, batch.first, batch.last, len(batch))}
