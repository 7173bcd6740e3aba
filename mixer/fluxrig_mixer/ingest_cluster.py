"""Telemetry ingest in a Mixer cluster (issue 14 item 5): which consumer a node uses, how far
the telemetry stream may be purged, and the (rack, WAL) -> incarnation numbers nodes share.

Job and contract.

- `ingest_role(cfg, store_name)` says how this node consumes `flux-telemetry`:
  * a single Mixer (no `[cluster]` routes): durable `mixer-ingest`, AckPolicy.ALL, as it has
    always been (the Standard tier is unchanged);
  * a cluster node storing into its own DuckDB: its OWN durable, `mixer-ingest-node-<node>`
    (AckPolicy.ALL), so every node receives every record and answers every query from its
    own file;
  * a cluster node with an external archive (ClickHouse): ONE durable shared by the nodes,
    `mixer-ingest-shared`, AckPolicy.EXPLICIT, so each message goes to one node and each
    record is written once. EXPLICIT, not ALL: with several pullers a cumulative ack from one
    node would cover messages another node has not stored yet. A node that dies leaves its
    fetch unacked; JetStream redelivers it to a survivor after the consumer's ack wait, and
    the store's idempotence (ReplacingMergeTree on (rack, time, id)) collapses what the dead
    node had inserted before it died.
- `purge_floor(js)`: the highest stream sequence that EVERY ingest consumer (every durable
  whose name starts with `mixer-ingest`) has acknowledged; the ingest purges up to there and
  never past it. One node's purge must not delete what another node's consumer has not
  stored (the stream is discard NEW: a node that stays down keeps the stream from being
  purged past its floor until an operator removes its consumer; that is the price of "every
  node holds everything").
- `SharedSources`: with a shared consumer, the nodes number each Rack's WALs (the Flux-Src
  header) from one JetStream KV bucket, `fluxrig-telemetry-sources`, with compare-and-set,
  so two nodes never give one WAL two numbers, nor two WALs one number (record ids are
  `incarnation << 40 | seq`). Keys: `s.<hash of rack and src>` -> incarnation, `n.<hash of
  rack>` -> the next free one. Allocation: read the pair; if absent, take the next number with
  a CAS on the counter, then `create` the pair (fails if another node created it meanwhile:
  then its number is used and ours is a harmless gap). The bucket has the replica count of
  the telemetry stream. A Rack gets at most `max_incarnations` numbers.

Raises: nats errors from the bus (the caller treats them as "the bus is down": nothing is
acked, it retries).
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
from dataclasses import dataclass

from fluxrig.wire import subjects as S

__all__ = [
    "IngestRole",
    "ingest_role",
    "node_consumer",
    "purge_floor",
    "number_sources",
    "SharedSources",
    "INGEST_PREFIX",
    "SHARED_CONSUMER",
    "SOURCES_BUCKET",
    "CAS_TRIES",
]

log = logging.getLogger("fluxrig.mixer.ingest")

INGEST_PREFIX = "mixer-ingest"  # == ingest.CONSUMER, the single node's durable
SHARED_CONSUMER = f"{INGEST_PREFIX}-shared"
SOURCES_BUCKET = "fluxrig-telemetry-sources"
# Compare-and-set rounds one allocation may take before it gives up (each lost round means
# another node allocated meanwhile; this many in a row means something is badly wrong).
CAS_TRIES = 64
_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class IngestRole:
    durable: str
    shared: bool  # several nodes pull one durable: explicit acks, shared WAL numbering


def node_consumer(node: str) -> str:
    """This node's own durable name (consumer names may not hold '.', '*', '>' or spaces)."""
    return f"{INGEST_PREFIX}-node-{_NAME_BAD.sub('_', node) or 'node'}"


def ingest_role(cfg, store_name: str) -> IngestRole:
    if not cfg.clustered:
        return IngestRole(INGEST_PREFIX, False)
    if store_name == "duckdb":
        return IngestRole(node_consumer(cfg.cluster.node_name or socket.gethostname()), False)
    return IngestRole(SHARED_CONSUMER, True)


async def purge_floor(js, own: str = INGEST_PREFIX) -> int | None:
    """The lowest ack floor among the telemetry stream's ingest consumers (`own`, this
    ingest's durable, and every one named `mixer-ingest*`); None when there is none."""
    floors, offset = [], 0
    while True:  # the server lists at most 256 consumers per request
        page = await js.consumers_info(S.STREAM_TELEMETRY, offset=offset or None)
        for info in page:
            name = info.name or (info.config.durable_name if info.config else "") or ""
            if name.startswith(INGEST_PREFIX) or name == own:
                floors.append(info.ack_floor.stream_seq if info.ack_floor else 0)
        offset += len(page)
        if len(page) < 256:
            break
    return min(floors) if floors else None


async def number_sources(shared: SharedSources, msgs, sources: dict, next_incarnation: dict, pending) -> None:
    """Give every (rack, Flux-Src) pair of a fetch its shared number before the fetch is
    decoded (ingest._decode then finds each in `sources` and never numbers one itself). A Rack
    past max_incarnations gets its next number set to the cap, so _decode refuses its new WALs
    (counted and logged there). New pairs go to `pending` (the store's sources table)."""
    from fluxrig.wire.telemetry import SRC_HEADER

    for m in msgs:
        rack = S.rack_of_subject(m.subject)
        if rack is None:
            continue
        src = (m.headers or {}).get(SRC_HEADER, "")[:128]
        if (rack, src) in sources:
            continue
        inc = await shared.incarnation(rack, src, next_incarnation.get(rack, 0))
        if inc is None:
            next_incarnation[rack] = shared.max_incarnations
            continue
        sources[(rack, src)] = inc
        next_incarnation[rack] = max(next_incarnation.get(rack, 0), inc + 1)
        pending.put((rack, src, inc))


def _h(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


class SharedSources:
    """(rack, src) -> incarnation numbers shared by the nodes, in a KV bucket (see above)."""

    def __init__(self, kv, max_incarnations: int):
        self.kv = kv
        self.max_incarnations = max_incarnations
        self.allocated = 0  # numbers this node took
        self.lost_races = 0  # CAS rounds another node won

    @classmethod
    async def open(cls, js, max_incarnations: int) -> SharedSources:
        import nats.js.errors
        from nats.js.api import KeyValueConfig

        try:
            kv = await js.key_value(SOURCES_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            replicas = (await js.stream_info(S.STREAM_TELEMETRY)).config.num_replicas or 1
            try:
                kv = await js.create_key_value(KeyValueConfig(bucket=SOURCES_BUCKET, history=1, replicas=replicas))
            except nats.js.errors.BadRequestError:  # another node created it first
                kv = await js.key_value(SOURCES_BUCKET)
        return cls(kv, max_incarnations)

    async def incarnation(self, rack: str, src: str, floor: int = 0) -> int | None:
        """The number of (rack, src); a new one when it has none (at least `floor`, the next
        number this node already knows of); None when the Rack has used up max_incarnations."""
        import nats.js.errors

        pair, counter = f"s.{_h(rack, src)}", f"n.{_h(rack)}"
        taken = (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError)
        for _ in range(CAS_TRIES):
            try:
                return int((await self.kv.get(pair)).value)
            except nats.js.errors.KeyNotFoundError:
                pass
            try:
                entry = await self.kv.get(counter)
                known, rev = int(entry.value), entry.revision
            except nats.js.errors.KeyNotFoundError:
                known, rev = 0, None
            n = max(known, floor)
            if n >= self.max_incarnations:
                return None
            try:
                if rev is None:
                    await self.kv.create(counter, str(n + 1).encode())
                else:
                    await self.kv.update(counter, str(n + 1).encode(), last=rev)
            except taken:
                self.lost_races += 1
                continue
            try:
                await self.kv.create(pair, str(n).encode())
            except taken:  # another node numbered this WAL meanwhile: read its number
                self.lost_races += 1
                continue
            self.allocated += 1
            return n
        raise RuntimeError(f"telemetry sources: {CAS_TRIES} compare-and-set rounds lost for rack {rack!r}")
