"""The audit trail shared by the nodes of a cluster (api/shared_audit.py), against a real
3-node nats-server cluster (R3 stream) and real DuckDB files: two Mixer nodes, each with its
own mixer.duckdb, on different servers. A call audited on one node is listed by the other;
a node cut off from the cluster keeps auditing and shares the rows once it is back; a node
restarted reads on from its cursor; a row sent twice or a stranger's message never doubles
or breaks the trail."""

from __future__ import annotations

import asyncio

import nats
import pytest
from fluxrig_mixer.api.auth import AuditLog, Principal
from fluxrig_mixer.api.shared_audit import SharedAudit
from fluxrig_mixer.registry import Database
from fluxrig_mixer.streams import audit_stream_config
from kv_nats import NatsCluster
from mixer_fixtures import wait_for

from fluxrig.wire import subjects as S

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(120)]

OPS = Principal("ops@site-1", "operate", "bearer")
CONFIG = audit_stream_config(86400.0, 64 * 1024 * 1024, replicas=3)


class Node:
    def __init__(self, tmp_path, name: str, url: str):
        self.name, self.url = name, url
        self.db = Database(str(tmp_path / f"{name}.duckdb"))
        self.audit = AuditLog(self.db)
        self.nc = None
        self.shared: SharedAudit | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        self.shared = SharedAudit(self.audit, self.name)
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # a young cluster may have no meta leader or placement yet
            try:
                await self.shared.start(self.nc.jetstream(), CONFIG)
                return
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def stop(self) -> None:
        if self.shared is not None:
            await self.shared.stop()
            self.shared = None
        if self.nc is not None:
            await self.nc.close()
            self.nc = None

    def paths(self) -> list[str]:
        return sorted(r["path"] for r in self.audit.list(limit=2000))

    def ids(self) -> list[str]:
        return [r[0] for r in self.db.cur().execute("SELECT id FROM api_audit").fetchall()]


@pytest.fixture
async def two_nodes(tmp_path):
    cluster = NatsCluster(tmp_path, 3)
    await cluster.start_all()
    a = Node(tmp_path, "node-a", cluster.url(0))
    b = Node(tmp_path, "node-b", cluster.url(1))
    try:
        await a.start()
        await b.start()
        yield cluster, a, b
    finally:
        await a.stop()
        await b.stop()
        a.db.close()
        b.db.close()
        await cluster.stop()


def call(node: Node, path: str, status: int = 200) -> None:
    node.audit.record(OPS, "POST", path, status, "10.0.0.7:51000")


async def test_a_call_audited_on_one_node_is_listed_by_the_other_with_who_and_where(two_nodes):
    _cluster, a, b = two_nodes
    call(a, "/api/v1/racks/gw-1/kill")
    call(b, "/api/v1/racks/gw-2/approve", 409)
    want = ["/api/v1/racks/gw-1/kill", "/api/v1/racks/gw-2/approve"]
    await wait_for(lambda: a.paths() == want and b.paths() == want, timeout=10, what="both rows on both nodes")
    row = next(r for r in b.audit.list() if r["path"].endswith("/kill"))
    assert (row["principal"], row["role"], row["via"], row["status"], row["client"], row["node"]) == (
        "ops@site-1", "operate", "bearer", 200, "10.0.0.7:51000", "node-a")  # fmt: skip
    mine = next(r for r in a.audit.list() if r["path"].endswith("/kill"))
    assert row["ts"] == mine["ts"]  # the time the serving node wrote, to the microsecond
    assert sorted(a.ids()) == sorted(b.ids()) and len(set(a.ids())) == 2  # once each, same ids
    assert a.shared.unshared() == 0 and b.shared.unshared() == 0


async def test_a_node_cut_off_keeps_auditing_and_shares_the_rows_when_it_is_back(two_nodes):
    cluster, a, b = two_nodes
    cluster.cut(0)  # node a's server: no quorum there, its publishes go unanswered
    for i in range(5):
        call(a, f"/api/v1/racks/cut-{i}/suspend")
    assert len(a.paths()) == 5  # audited here at once, bus or not
    await asyncio.sleep(4)  # past a publish timeout: still unshared, nothing lost
    assert a.shared.unshared() == 5 and b.paths() == []
    call(b, "/api/v1/racks/other/approve")  # the majority side goes on
    cluster.heal(0)
    want = sorted([f"/api/v1/racks/cut-{i}/suspend" for i in range(5)] + ["/api/v1/racks/other/approve"])
    await wait_for(lambda: a.paths() == want and b.paths() == want, timeout=30, what="the trails converge")
    assert len(b.ids()) == len(set(b.ids())) == 6 and a.shared.unshared() == 0


async def test_a_restarted_node_reads_on_from_its_cursor_and_nothing_doubles(two_nodes):
    _cluster, a, b = two_nodes
    call(a, "/api/v1/racks/one/kill")
    await wait_for(lambda: len(b.paths()) == 1, timeout=10, what="the first row on b")
    await b.stop()
    for i in range(3):
        call(a, f"/api/v1/racks/while-b-was-down-{i}/revive")
    # Lost acks (a node killed between JetStream's ack and its own note of it) re-send rows:
    # one within the duplicate window (JetStream drops it), one as a new message (ids do).
    a.db.cur().execute("UPDATE api_audit SET shared = false WHERE path = '/api/v1/racks/one/kill'")
    a.shared._wake.set()
    await wait_for(lambda: a.shared.unshared() == 0, timeout=10, what="the re-send")
    js = a.nc.jetstream()
    first = a.db.cur().execute("SELECT id FROM api_audit WHERE path = '/api/v1/racks/one/kill'").fetchone()[0]
    rows = await js.get_msg(S.STREAM_AUDIT, 1)
    await js.publish(S.MIXER_AUDIT, rows.data, headers={"Nats-Msg-Id": first + "-again"})
    await b.start()
    assert len(b.paths()) == 4  # start waited for the replay from its cursor
    assert sorted(b.ids()) == sorted(a.ids()) and len(set(b.ids())) == 4
    assert b.shared.applied == 3  # only what it lacked: the doubled message was skipped
    info = await js.stream_info(S.STREAM_AUDIT)
    assert b.shared.cursor() == info.state.last_seq


async def test_a_message_that_is_not_an_audit_row_is_skipped_and_the_trail_goes_on(two_nodes):
    _cluster, a, b = two_nodes
    js = a.nc.jetstream()
    for junk in (b"not json", b'{"id": "x"}', b'{"ts_us": 1, "status": "x", "id": "y", "method": "POST"}',
                 b'{"ts_us": 1, "status": 200, "id": 7, "method": "POST"}', b"[" * 5000):  # fmt: skip
        await js.publish(S.MIXER_AUDIT, junk)
    call(a, "/api/v1/scenarios/activate")
    await wait_for(lambda: b.paths() == ["/api/v1/scenarios/activate"], timeout=10, what="the row after the junk")
    assert b.shared.malformed == 5 and a.shared.malformed == 5


def test_a_batch_read_back_costs_the_loop_a_few_statements_not_one_per_row(tmp_path):
    """The follower applies a batch on the Mixer's event loop: one INSERT per row cost ~1 ms
    each on a quiet box (a 512-row batch ~0.5 s; under load, bursts of API calls stalled
    heartbeats 40-60 ms: test_mixer_guard). Batched: three statements whatever the size. Real
    DuckDB files: a node's own 512 rows read back (all present: none inserted), then the same
    batch plus one row twice into another node's empty table (each inserted once)."""
    import json
    import time

    from fluxrig_mixer.api.auth import ensure_tables
    from fluxrig_mixer.api.shared_audit import _CURSOR_TABLE

    def node(name: str):
        db = Database(str(tmp_path / f"{name}.duckdb"))
        ensure_tables(db)
        db.ensure(_CURSOR_TABLE)
        audit = AuditLog(db, name)
        return db, audit, SharedAudit(audit, name)

    db1, audit1, shared1 = node("n1")
    for i in range(512):
        audit1.record(None, "POST", f"/api/v1/scenarios/import?n={i}", 400, "127.0.0.1")
    keys = ("ts_us", "principal", "role", "via", "method", "path", "status", "client", "id", "node")
    rows = db1.cur().execute(
        f"SELECT epoch_us(ts), {', '.join(keys[1:])} FROM api_audit ORDER BY ts, id"
    ).fetchall()  # fmt: skip
    batch = [(i + 1, json.dumps(dict(zip(keys, r))).encode()) for i, r in enumerate(rows)]

    t0 = time.perf_counter()
    shared1._apply(batch)
    own = time.perf_counter() - t0
    assert shared1.applied == 0 and shared1.cursor() == 512
    assert db1.cur().execute("SELECT count(*) FROM api_audit").fetchone()[0] == 512

    db2, _audit2, shared2 = node("n2")
    t0 = time.perf_counter()
    shared2._apply(batch + [(513, batch[7][1]), (514, b"not a row")])
    other = time.perf_counter() - t0
    assert shared2.applied == 512 and shared2.malformed == 1 and shared2.cursor() == 514
    got = db2.cur().execute("SELECT count(*), count(DISTINCT id), bool_and(shared) FROM api_audit").fetchone()
    assert got == (512, 512, True)
    assert db2.cur().execute("SELECT min(node), max(node) FROM api_audit").fetchone() == ("n1", "n1")
    # one INSERT per row: ~380 ms each way for these 512 on a quiet box; batched ~14 ms (own rows,
    # the read-back of every single-node Mixer) and ~80 ms (512 rows inserted)
    assert own < 0.15 and other < 0.5, (own, other)
    for db in (db1, db2):
        db.close()
