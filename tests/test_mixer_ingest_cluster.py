"""Telemetry in a Mixer cluster (issue 14 item 5), on a real 3-node nats-server cluster (routes
on loopback, JetStream R3 streams) with one telemetry ingest per node:

- DuckDB: each node has its own durable consumer and its own DuckDB file, and every file ends
  up with every record; the stream is purged only up to what EVERY node's consumer acked, so a
  node that was down catches up on everything when it returns.
- ClickHouse: the nodes share one durable consumer (explicit acks) and number Rack WALs in one
  KV bucket: every record is written once, each WAL has one number, no two WALs of a Rack
  share one, and a node that dies with a fetch in hand costs nothing (JetStream redelivers it
  to a survivor; the table collapses what the dead node had inserted).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import nats
import pytest
from clickhouse_server import USER, fresh_database
from fluxrig_mixer.app import ensure_streams
from fluxrig_mixer.config import load_config
from fluxrig_mixer.ingest import TelemetryIngest
from fluxrig_mixer.ingest_cluster import SHARED_CONSUMER, SOURCES_BUCKET, node_consumer, purge_floor
from fluxrig_mixer.registry import Database
from fluxrig_mixer.snake import find_nats_server
from mixer_fixtures import wait_for

from fluxrig.wire import subjects as S
from fluxrig.wire.telemetry import SRC_HEADER

NODES = 3
LINES = 50
READY_S = 60.0
# Long enough that a write on a loaded box is not redelivered; short enough for the kill below.
ACK_WAIT_S = 10.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsCluster:
    """NODES nats-servers routed together on loopback, JetStream on each (test-only config:
    loopback, no auth, which the Mixer itself never renders)."""

    def __init__(self, root):
        self.root = str(root)
        self.ports = [_free_port() for _ in range(NODES)]
        self.routes = [_free_port() for _ in range(NODES)]
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        binary = find_nats_server()
        for i in range(NODES):
            d = os.path.join(self.root, f"n{i}")
            os.makedirs(d, exist_ok=True)
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.routes) if j != i)
            conf = os.path.join(d, "nats.conf")
            with open(conf, "w") as fh:
                fh.write(
                    f'server_name: "n{i}"\nlisten: "127.0.0.1:{self.ports[i]}"\n'
                    f'jetstream {{ store_dir: "{d}/js" }}\n'
                    f'cluster {{ name: "t", listen: "127.0.0.1:{self.routes[i]}", routes: [{routes}] }}\n'
                )
            log = open(os.path.join(d, "log"), "wb")
            self.procs.append(subprocess.Popen([binary, "-c", conf], stdout=log, stderr=subprocess.STDOUT))
            log.close()

    def url(self, i: int) -> str:
        return f"nats://127.0.0.1:{self.ports[i]}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(20)


async def _streams_ready(js) -> None:
    """The cluster's meta group needs a leader before streams can be made."""
    cfg = load_config(None, environ={}).snake
    deadline = time.monotonic() + READY_S
    while True:
        try:
            await ensure_streams(js, cfg, replicas=NODES)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.fixture
async def cluster(tmp_path):
    c = NatsCluster(tmp_path / "nats")
    c.start()
    conns = []
    try:
        for i in range(NODES):
            deadline = time.monotonic() + READY_S
            while True:
                try:
                    conns.append(await nats.connect(c.url(i), max_reconnect_attempts=0, connect_timeout=2))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        await _streams_ready(conns[0].jetstream())
        yield c, conns
    finally:
        for nc in conns:
            if not nc.is_closed:
                await nc.close()
        c.stop()


async def _publish(js, racks, wals, batches: int, nxt: dict | None = None) -> dict[tuple[str, str], int]:
    """`batches` NDJSON log batches spread over racks and WALs; ids counted per (rack, WAL),
    going on from `nxt` (updated); returns how many records each (rack, WAL) got here."""
    nxt = {} if nxt is None else nxt
    sent: dict[tuple[str, str], int] = {}
    for b in range(batches):
        rack, wal = racks[b % len(racks)], wals[(b // len(racks)) % len(wals)]
        first = nxt.get((rack, wal), 0)
        body = "".join(
            json.dumps({"id": first + k, "ts": time.time_ns(), "severity": 9, "body": f"{rack}/{wal} {first + k}"})
            + "\n"
            for k in range(LINES)
        )
        await js.publish(S.telemetry(rack, "logs"), body.encode(), headers={SRC_HEADER: wal})
        nxt[(rack, wal)] = first + LINES
        sent[(rack, wal)] = sent.get((rack, wal), 0) + LINES
    return sent


def _duck_rows(db: Database) -> int:
    return db.conn.execute("SELECT count(*) FROM telemetry_logs").fetchone()[0]


async def test_duckdb_nodes_each_hold_every_record_and_a_returning_node_catches_up(cluster, tmp_path):
    c, conns = cluster
    dbs = [Database(str(tmp_path / f"node{i}.duckdb")) for i in range(NODES)]

    def ingest(i):
        return TelemetryIngest(dbs[i], durable=node_consumer(f"n{i}"), flush_interval=0.05, purge_interval=0.2)

    ingests = [ingest(i) for i in range(NODES)]
    for i, ing in enumerate(ingests):
        await ing.start(conns[i].jetstream())
    js = conns[0].jetstream()
    try:
        sent = await _publish(js, ["r1", "r2"], ["w0"], 20)
        total = sum(sent.values())
        await wait_for(lambda: all(_duck_rows(db) == total for db in dbs), timeout=60)

        # Node 2 goes away; the others go on storing and purging.
        await ingests[2].stop()
        more = await _publish(js, ["r1", "r2"], ["w1"], 20)
        total2 = total + sum(more.values())
        await wait_for(lambda: all(_duck_rows(db) == total2 for db in dbs[:2]), timeout=60)
        await asyncio.sleep(1.0)  # several purge rounds of the two survivors
        floor = await purge_floor(js)
        info = await js.stream_info(S.STREAM_TELEMETRY)
        assert info.state.first_seq <= floor + 1  # nothing past node 2's floor was purged
        assert info.state.messages >= 20  # node 2's backlog still waits in the stream

        # Node 2 returns (same durable, same file) and gets what it missed.
        dbs[2] = Database(str(tmp_path / "node2.duckdb"))
        ingests[2] = ingest(2)
        await ingests[2].start(conns[2].jetstream())
        await wait_for(lambda: _duck_rows(dbs[2]) == total2, timeout=60)
        for db in dbs:
            distinct = db.conn.execute("SELECT count(DISTINCT (rack, id)) FROM telemetry_logs").fetchone()[0]
            assert distinct == total2

        async def purged():
            return (await js.stream_info(S.STREAM_TELEMETRY)).state.messages == 0

        await wait_for(purged, timeout=30)  # all three acked: the stream empties
    finally:
        for ing in ingests:
            await ing.stop()
        for db in dbs:
            db.close()


async def test_clickhouse_nodes_share_one_consumer_and_write_each_record_once(cluster, clickhouse, tmp_path):
    from fluxrig_mixer.clickhouse_store import ClickHouseSettings, ClickHouseStore

    c, conns = cluster
    database = fresh_database("shared")

    def store():
        s = ClickHouseSettings(
            port=clickhouse.port, user=USER, password=clickhouse.password, database=database, flush_interval=0.05
        )
        return ClickHouseStore(s, spool_dir=str(tmp_path))

    ingests = [
        TelemetryIngest(store(), durable=SHARED_CONSUMER, shared=True, batch_max_messages=4, ack_wait=ACK_WAIT_S)
        for _ in range(NODES)
    ]
    for i, ing in enumerate(ingests):
        await ing.start(conns[i].jetstream())
    js = conns[0].jetstream()
    ch = clickhouse.client()
    racks, wals = ["r1", "r2", "r3"], ["w0", "w1", "w2", "w3"]
    try:
        ids: dict = {}
        sent = await _publish(js, racks, wals, 120, ids)
        total = sum(sent.values())
        t = f"{database}.telemetry_logs"
        await wait_for(lambda: ch.execute(f"SELECT uniqExact(rack, id) FROM {t}")[0][0] >= total, timeout=90)
        await asyncio.sleep(0.5)  # a write still in flight would show here
        physical, distinct = ch.execute(f"SELECT count(), uniqExact(rack, id) FROM {t}")[0]
        assert (physical, distinct) == (total, total)  # each record written once, none collided
        handled = [ing.messages for ing in ingests]
        assert sum(handled) == 120

        # Each WAL one number, no two WALs of a Rack with one number, the same in KV and table.
        rows = ch.execute(f"SELECT rack, src, incarnation FROM {database}.telemetry_sources FINAL")
        assert len(rows) == len(racks) * len(wals)
        for r in racks:
            numbers = [i for rack, _s, i in rows if rack == r]
            assert len(set(numbers)) == len(wals)
        assert any(ing._shared_sources.allocated for ing in ingests)
        await js.key_value(SOURCES_BUCKET)  # the bucket exists, replicated like the stream

        # A node dies with fetches in hand: its connection drops before it acks.
        victim = ingests[0]
        held = asyncio.Event()
        victim.store.before_write = lambda: held.set() or time.sleep(0.5)
        more = await _publish(js, racks, wals, 60, ids)
        total2 = total + sum(more.values())
        await wait_for(held.is_set, timeout=60)
        await conns[0].close()  # the node's bus is gone: nothing it holds can be acked
        try:
            await wait_for(lambda: ch.execute(f"SELECT uniqExact(rack, id) FROM {t}")[0][0] == total2, timeout=90)
        except AssertionError:
            info = await conns[1].jetstream().consumer_info(S.STREAM_TELEMETRY, SHARED_CONSUMER)
            print("DEBUG", total2, ch.execute(f"SELECT uniqExact(rack, id), count() FROM {t}"), info)
            for ing in ingests:
                print("DEBUG", ing.stats)
            raise
        final, distinct = ch.execute(f"SELECT count(), uniqExact(rack, id) FROM {t} FINAL")[0]
        assert final == distinct == total2  # the query path shows each record once
    finally:
        for ing in ingests:
            try:
                await asyncio.wait_for(ing.stop(), 30)
            except Exception:
                pass
        ch.execute(f"DROP DATABASE IF EXISTS {database}")
        ch.disconnect()


# -- end to end: three real `fluxrig-mixer serve` nodes (tests/cluster_fixtures.py) -----------


def test_every_mixer_node_of_a_cluster_answers_every_telemetry_query(tmp_path):
    """A Rack's telemetry sent to one node is in every node's DuckDB: each node's API returns
    all of it (its own consumer mixer-ingest-node-<node>)."""
    from cluster_fixtures import MixerCluster

    enroll = "auto_adopt = true\nfirst_token_uses = 0\n"
    with MixerCluster(tmp_path / "c", NODES, enrollment_toml=enroll) as c:
        asyncio.run(_every_node_answers(tmp_path, c))


async def _every_node_answers(tmp_path, c) -> None:
    from cluster_fixtures import enroll_rack, streams_ready

    from fluxrig.agent.session import SessionUnavailable

    for n in c.nodes:
        await wait_for(lambda n=n: streams_ready(n), 90, what=f"R3 streams current on {n.name}")
    agent = await enroll_rack(tmp_path, str(c.nodes[0].state / "enroll-bundle"))
    try:
        rack, batches = agent.rack_name, 8
        for b in range(batches):
            body = "".join(
                json.dumps({"id": b * LINES + k, "ts": time.time_ns(), "severity": 9, "body": f"rec {b * LINES + k}"})
                + "\n"
                for k in range(LINES)
            ).encode()
            for _ in range(20):  # a busy box: re-send the same bytes, as the Rack's WAL shipper does
                try:
                    await agent.publish(S.telemetry(rack, "logs"), body, headers={SRC_HEADER: "w0"})
                    break
                except (TimeoutError, SessionUnavailable, nats.errors.TimeoutError):
                    await asyncio.sleep(0.2)
        want = set(range(batches * LINES))

        def ids(node) -> set[int]:
            with node.client() as api:
                r = api.get("/api/v1/telemetry/logs", params={"rack": rack, "limit": 1000})
                return {row["id"] for row in r.json()} if r.status_code == 200 else set()

        for n in c.nodes:
            await wait_for(lambda n=n: ids(n) == want, 60, what=f"every record in {n.name}'s DuckDB")
            with n.client() as api:
                assert api.get("/api/v1/telemetry/logs", params={"rack": rack, "limit": 1000}).status_code == 200
    finally:
        await agent.stop()
        await agent.applied.stop()
