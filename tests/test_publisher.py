"""The WAL -> JetStream pump (fluxrig/agent/pump.py, publisher.py): the sans-IO plan and pacer alone,
then WalPublisher over a real lane WAL and the in-memory Snake of tests/fake_session.py:
batching, the window, a failure mid-window, restart from the first unacknowledged record,
a dropped connection, order per subject."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import cbor2
import pytest
from fake_session import FakeJetStream, FakeSession

from fluxrig.agent.lanes import LaneCodec
from fluxrig.agent.publisher import (
    AimdPacer,
    DropReason,
    Entry,
    Pacing,
    PumpLimits,
    ReadSizer,
    WalPublisher,
    WindowPlan,
)
from fluxrig.msg import FluxMsg
from fluxrig.runtime.bus import dedup_id
from fluxrig.wal import AsyncWal
from fluxrig.wal.parked import list_parked
from fluxrig.wire.batch import decode_lane_batch

pytestmark = pytest.mark.timeout(60)

SUBJECTS = ["flux.msg.edge.a.out", "flux.msg.edge.b.out", "flux.msg.edge.c.out"]


# -- the plan, sans-IO -----------------------------------------------------------------------


def recs(seqs, subject_of=lambda s: SUBJECTS[s % 3], size=10):
    return [SimpleNamespace(seq=s, payload=cbor2.dumps([subject_of(s), size])) for s in seqs]


def parse(seq, payload, rack=""):
    subject, size = cbor2.loads(payload)
    if subject == "bad":
        return DropReason.UNDECODABLE
    return Entry(seq, subject, size, None)


def test_plan_groups_by_subject_keeps_order_and_bounds_batches():
    plan = WindowPlan(PumpLimits(max_batch_records=4, max_batch_bytes=35, max_inflight_bytes=10_000), 1)
    assert plan.want_read(100) == 100
    assert plan.add(recs(range(1, 31)), parse) == []
    batches = []
    while (b := plan.cut(window=100)) is not None:
        batches.append(b)
    # Oldest subject first, each batch one subject, at most 3 records (35 bytes / 10 each).
    assert [b.subject for b in batches[:3]] == [SUBJECTS[1], SUBJECTS[2], SUBJECTS[0]]
    assert all(len(b) <= 3 and b.size <= 35 for b in batches)
    assert sorted(e.seq for b in batches for e in b.entries) == list(range(1, 31))
    for subject in SUBJECTS:
        seqs = [e.seq for b in batches if b.subject == subject for e in b.entries]
        assert seqs == sorted(seqs)
    assert plan.inflight_records == 30 and plan.pending_records == 0


def test_plan_window_and_inflight_bytes_bound_what_goes_out():
    plan = WindowPlan(PumpLimits(max_batch_records=2, max_batch_bytes=1000, max_inflight_bytes=45), 1)
    plan.add(recs(range(1, 21), subject_of=lambda s: SUBJECTS[0]), parse)
    assert plan.cut(1) is not None and plan.cut(1) is None  # window of one batch
    assert plan.cut(3) is not None and plan.cut(3) is not None  # 60 bytes in flight >= 45
    assert plan.cut(10) is None
    assert plan.inflight_batches == 3


def test_plan_restarts_from_the_first_unacked_and_skips_what_was_acked_beyond_it():
    plan = WindowPlan(PumpLimits(max_batch_records=3, max_batch_bytes=1000), 1)
    plan.add(recs(range(1, 13), subject_of=lambda s: SUBJECTS[0]), parse)
    b1, b2, b3, b4 = (plan.cut(10) for _ in range(4))
    assert plan.acked(b1) == [1, 2, 3]
    plan.failed(b2)  # 4..6 lost
    assert plan.acked(b3) == [7, 8, 9]  # stored after the failure: must not be re-sent
    plan.failed(b4)
    assert plan.first_unacked == 4
    assert plan.restart() == 4 and plan.next_read == 4
    assert plan.acked(b3) == []  # a late ack of an abandoned batch changes nothing
    plan.add(recs(range(4, 13), subject_of=lambda s: SUBJECTS[0]), parse)
    again = []
    while (b := plan.cut(10)) is not None:
        again += [e.seq for e in b.entries]
    assert again == [4, 5, 6, 10, 11, 12]


def test_plan_cuts_a_lost_batch_again_with_the_same_records():
    plan = WindowPlan(PumpLimits(max_batch_records=6, max_batch_bytes=1000), 1)
    plan.add(recs(range(1, 7), subject_of=lambda s: SUBJECTS[0]), parse)
    lost = plan.cut(10)
    assert [e.seq for e in lost.entries] == [1, 2, 3, 4, 5, 6]
    plan.failed(lost)
    plan.restart()
    plan.add(recs(range(1, 4), subject_of=lambda s: SUBJECTS[0]), parse)  # a smaller read this time
    assert plan.cut(10) is None and plan.want_read(8) == 8  # waits for the rest of the lost batch
    plan.add(recs(range(4, 11), subject_of=lambda s: SUBJECTS[0]), parse)
    again = plan.cut(10)
    assert [e.seq for e in again.entries] == [1, 2, 3, 4, 5, 6]  # same records: same Nats-Msg-Id
    assert [e.seq for e in plan.cut(10).entries] == [7, 8, 9, 10]


def test_plan_fills_batches_from_a_backlog_without_delaying_a_lone_record():
    plan = WindowPlan(PumpLimits(max_batch_records=10, max_batch_bytes=1000), 1)
    plan.add(recs([1], subject_of=lambda s: SUBJECTS[0]), parse)
    assert len(plan.cut(4, more_coming=True)) == 1  # nothing in flight: goes at once
    plan.add(recs(range(2, 6), subject_of=lambda s: SUBJECTS[0]), parse)
    assert plan.cut(4, more_coming=True) is None  # one in flight, more in the WAL: read first
    assert len(plan.cut(4, more_coming=False)) == 4  # nothing more to read: go
    plan.add(recs(range(6, 16), subject_of=lambda s: SUBJECTS[0]), parse)
    assert len(plan.cut(4, more_coming=True)) == 10  # full: goes


def test_plan_counts_drops_as_acknowledged():
    plan = WindowPlan(PumpLimits(), 1)
    dropped = plan.add(recs([1, 2, 3], subject_of=lambda s: "bad" if s == 2 else SUBJECTS[0]), parse)
    assert [(seq, reason) for seq, _size, reason in dropped] == [(2, DropReason.UNDECODABLE)]
    b = plan.cut(4)
    assert [e.seq for e in b.entries] == [1, 3]
    plan.acked(b)
    assert plan.first_unacked == 4 and plan.restart() == 4


def test_plan_stops_reading_while_a_full_batch_waits():
    plan = WindowPlan(PumpLimits(max_batch_records=5), 1)
    plan.add(recs(range(1, 6)), parse)
    assert plan.want_read(64) == 0
    plan.cut(1)
    assert plan.want_read(64) == 64


# -- the pacer, sans-IO ----------------------------------------------------------------------


def test_aimd_grows_by_about_one_per_round_trip_while_inside_budgets_and_full():
    p = AimdPacer(Pacing(initial_window=2, max_window=8, rtt_budget=0.1, lag_budget=0.005))
    now = 0.0
    for _ in range(2):  # one window's worth of acks: +1
        now += 0.01
        p.on_ack(now, 0.01, 0.0, was_full=True)
    assert p.window == 3
    for _ in range(5):  # not the limit: no reason to grow
        p.on_ack(now, 0.01, 0.0, was_full=False)
    assert p.window == 3
    for _ in range(200):
        now += 0.01
        p.on_ack(now, 0.01, 0.0, was_full=True)
    assert p.window == 8  # capped


@pytest.mark.parametrize("rtt, lag", [(0.2, 0.0), (0.01, 0.02)])
def test_aimd_halves_once_per_round_trip_when_a_budget_is_exceeded(rtt, lag):
    p = AimdPacer(Pacing(initial_window=8, max_window=8, rtt_budget=0.1, lag_budget=0.005))
    p.on_ack(1.0, rtt, lag, True)
    assert p.limit == 4
    p.on_ack(1.0 + 0.001, rtt, lag, True)  # the same burst: one signal
    assert p.limit == 4
    p.on_ack(1.5, rtt, lag, True)
    assert p.limit == 2 and p.decreases == 2


def test_aimd_below_one_is_a_duty_cycle_and_a_budget_of_zero_is_off():
    p = AimdPacer(Pacing(initial_window=1, min_window=0.1, max_window=4, rtt_budget=0.1, lag_budget=0.0))
    assert p.pause() == 0.0
    now = 0.0
    for _ in range(5):
        now += 1
        p.on_failure(now)
    assert p.limit == pytest.approx(0.1) and p.window == 1
    p.rtt = 0.01
    assert p.pause() == pytest.approx(0.1)  # one batch per 10 round trips
    p.on_ack(now + 1, 0.01, 10.0, True)  # lag ignored: lag_budget 0
    assert p.limit > 0.1


def test_read_sizer_fits_a_step_in_its_budget():
    s = ReadSizer(PumpLimits(min_read_records=16, max_read_records=1024), budget=0.002)
    s.measured(100, 0.001)  # 10 us per record
    assert s.step() == 200
    s.measured(100, 1.0)
    assert s.step() == 16


# -- the pump over a real WAL and the fake Snake --------------------------------------------


def lane_record(subject: str, i: int) -> tuple[bytes, str]:
    m = FluxMsg(raw=b"m%d" % i)
    m.hop(b"g" * 16, b"p" * 16)
    rid = dedup_id(m, subject)
    return cbor2.dumps([subject, rid, m.to_cbor()]), rid


@pytest.fixture
async def lane_wal(tmp_path):
    wal = await AsyncWal.open(str(tmp_path / "lanes"), fsync="never")
    yield wal
    await wal.close()


def snake(**kw) -> tuple[FakeJetStream, FakeSession]:
    js = FakeJetStream()
    js.add_stream("flux-msg", ["flux.msg.>"])
    return js, FakeSession(js, "edge", **kw)


async def append(wal, n: int, subjects=SUBJECTS, start: int = 0) -> list[tuple[str, str]]:
    out = []
    for i in range(start, start + n):
        subject = subjects[i % len(subjects)]
        payload, rid = lane_record(subject, i)
        wal.append_nowait(payload)
        out.append((subject, rid))
    await wal.flush()
    return out


def received(js: FakeJetStream) -> dict[str, list[str]]:
    """subject -> record ids in stream order, as a receiver would see them (duplicates kept)."""
    out: dict[str, list[str]] = {}
    for m in js.stored("flux-msg"):
        out.setdefault(m.subject, []).extend(rid for rid, _body in decode_lane_batch(m.data))
    return out


async def until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def expected(sent) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for subject, rid in sent:
        out.setdefault(subject, []).append(rid)
    return out


async def test_many_records_per_message_order_per_subject_and_wal_acked(lane_wal):
    js, session = snake(ack_delay=0.002)
    pub = WalPublisher(lane_wal, session, LaneCodec(), retry_wait=0.05, idle_wait=0.05)
    sent = await append(lane_wal, 3000)
    pub.start()
    try:
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="every record acknowledged")
        assert received(js) == expected(sent)  # each once, in order per subject
        m = pub.metrics()
        assert m["published"] == 3000 and m["records_per_batch"] > 20, m
        assert m["publish_failures"] == 0 and m["backlog_records"] == 0
        # Live records after the backlog flow too, and soon.
        more = await append(lane_wal, 7, start=3000)
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, timeout=2, what="live records")
        assert received(js) == expected(sent + more)
    finally:
        await pub.close()


async def test_a_lost_ack_mid_window_restarts_from_the_first_unacknowledged(lane_wal):
    js, session = snake(ack_delay=0.005)
    pub = WalPublisher(lane_wal, session, LaneCodec(), publish_timeout=0.3, retry_wait=0.05,
                       limits=PumpLimits(max_batch_records=50))  # fmt: skip
    sent = await append(lane_wal, 1000)
    session.lose_acks(1)  # the first batch is stored, its PubAck never comes
    pub.start()
    try:
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="every record acknowledged")
        m = pub.metrics()
        assert m["publish_failures"] == 1 and m["restarts"] == 1
        got = received(js)
        want = expected(sent)
        for subject, rids in got.items():
            assert sorted(set(rids)) == sorted(want[subject]) and set(rids) == set(want[subject])
        # The re-send of the batch whose ack was lost had the same records: JetStream dropped it.
        assert js.duplicates >= 1
        assert sum(len(v) for v in got.values()) == 1000
    finally:
        await pub.close()


async def test_failed_publishes_lose_nothing(lane_wal):
    js, session = snake()
    pub = WalPublisher(lane_wal, session, LaneCodec(), retry_wait=0.02, limits=PumpLimits(max_batch_records=30))
    sent = await append(lane_wal, 600)
    session.fail_next(3)
    pub.start()
    try:
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="every record acknowledged")
        assert received(js) == expected(sent)  # nothing was stored by the failed ones: no doubles either
        assert pub.metrics()["publish_failures"] >= 1
    finally:
        await pub.close()


async def test_a_dropped_connection_abandons_the_window_at_once(lane_wal):
    js, session = snake(ack_delay=0.05)
    pub = WalPublisher(lane_wal, session, LaneCodec(), publish_timeout=30.0, retry_wait=0.02, state_poll=0.02,
                       limits=PumpLimits(max_batch_records=10))  # fmt: skip
    sent = await append(lane_wal, 400)
    pub.start()
    try:
        await until(lambda: pub.plan.inflight_batches >= 2, what="publishes in flight")
        session.drop()
        t0 = time.monotonic()
        await until(lambda: pub.plan.inflight_batches == 0, timeout=2, what="the window abandoned")
        assert time.monotonic() - t0 < 1.0  # not publish_timeout (30 s)
        assert lane_wal.cursor < lane_wal.committed_seq  # the rest waits in the WAL
        await asyncio.sleep(0.1)
        stored_while_down = len(js.stored("flux-msg"))
        await asyncio.sleep(0.1)
        assert len(js.stored("flux-msg")) == stored_while_down
        session.restore()
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="the rest after the reconnect")
        got, want = received(js), expected(sent)
        for subject in want:  # stored before the drop (without an ack) and again: the LRU's job
            assert list(dict.fromkeys(got[subject])) == want[subject]
        assert pub.metrics()["abandoned"] >= 1
    finally:
        await pub.close()


async def test_nothing_ships_while_the_session_waits_renamed_records_migrate_undecodable_parked(lane_wal):
    js, session = snake()
    session.wait_state()
    pub = WalPublisher(lane_wal, session, LaneCodec(), idle_wait=0.02)
    sent = await append(lane_wal, 20)
    # queued under a former name of this rack ("other", now "edge"): sent under the new name
    former, rid = lane_record("flux.msg.other.gen.out", 99)
    lane_wal.append_nowait(former)
    lane_wal.append_nowait(b"\xff not cbor")
    lane_wal.append_nowait(cbor2.dumps(["not.a.lane.subject", "x", b"y"]))
    await lane_wal.flush()
    pub.start()
    try:
        await asyncio.sleep(0.2)
        assert js.stored("flux-msg") == [] and lane_wal.cursor == 0
        session.restore()
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="shipped once usable")
        want = expected(sent)
        want.setdefault("flux.msg.edge.gen.out", []).append(rid)
        assert received(js) == want
        m = pub.metrics()
        assert m["dropped"] == {"undecodable": 1, "foreign": 1}
        assert pub.codec.migrated == 1
        parked = list_parked(lane_wal.wal.directory)
        assert [p["reason"] for p in parked] == ["undecodable", "foreign"]
        with open(parked[0]["file"], "rb") as fh:
            assert fh.read() == b"\xff not cbor"
        assert os.stat(parked[0]["file"]).st_mode & 0o077 == 0
    finally:
        await pub.close()


async def test_a_new_publisher_starts_after_the_wal_cursor(lane_wal):
    js, session = snake()
    pub = WalPublisher(lane_wal, session, LaneCodec())
    await append(lane_wal, 50)
    pub.start()
    await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="shipped")
    await pub.close()
    n = len(js.stored("flux-msg"))
    pub2 = WalPublisher(lane_wal, session, LaneCodec())
    pub2.start()
    await asyncio.sleep(0.1)
    await pub2.close()
    assert len(js.stored("flux-msg")) == n and pub2.metrics()["published"] == 0


async def test_a_rate_cap_bounds_the_drain(lane_wal):
    js, session = snake()
    pub = WalPublisher(lane_wal, session, LaneCodec(), pacing=Pacing(rate=2000.0),
                       limits=PumpLimits(max_batch_records=100))  # fmt: skip
    await append(lane_wal, 600)
    t0 = time.monotonic()
    pub.start()
    try:
        await until(lambda: lane_wal.cursor == lane_wal.committed_seq, what="shipped")
        assert time.monotonic() - t0 >= 0.2  # 600 records at 2000/s: the last batch goes at 0.25 s
    finally:
        await pub.close()
