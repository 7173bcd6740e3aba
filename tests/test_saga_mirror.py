"""Owed reversals outlive their Rack (issue 17 item 4): the saga mirror against a real
nats-server, with real saga journals (SagaStore: WAL files, fsync) for two and three members of
group `pos`. A member that falls silent has its open reversals claimed by a survivor within the
lease, resumed at their attempt counts on the survivor's leg of the same name; back from the
dead it hands them over instead of sending them again. The wire and replay rules are tested
sans-IO first."""

from __future__ import annotations

import asyncio
import os
import time

import nats
import pytest
from kv_nats import NatsCluster

from fluxrig.msg import FluxMsg
from fluxrig.saga import mirror_wire as W
from fluxrig.saga.mirror import JsSafBus, SagaMirror
from fluxrig.saga.orchestrator import OwedReversal, Reversals, SagaSettings
from fluxrig.saga.reversal import ReversalPolicy
from fluxrig.saga.saf import EV_END, EV_OWE, EV_TRY, Saga, fold
from fluxrig.saga.seal import FieldSeal
from fluxrig.saga.store import SagaStore
from fluxrig.wire import meta as M
from fluxrig.wire import subjects as S

GROUP, GEAR = "pos", "sw"
PAN = "4111111111111111"


# -- the wire, sans-IO -----------------------------------------------------------------------
def _owe(i: int) -> dict:
    return {"e": EV_OWE, "id": f"s{i}", "queue": "out_iss", "mti": "0400", "fields": {"11": f"{i:06d}"}, "wall": i}


def _msgs(*docs) -> list:
    return [W.decode(W.encode(*d[:-1], **d[-1]) if isinstance(d[-1], dict) else W.encode(*d), seq=i + 1)
            for i, d in enumerate(docs)]  # fmt: skip


def test_messages_round_trip_and_bad_ones_name_what_is_wrong():
    m = W.decode(W.encode(W.KIND_EVENTS, [(3, _owe(1))]), seq=9)
    assert (m.kind, m.events, m.seq) == ("ev", [(3, _owe(1))], 9)
    c = W.decode(W.encode(W.KIND_CLAIM, by="rack-b", upto=7))
    assert (c.kind, c.by, c.upto) == ("claim", "rack-b", 7)
    with pytest.raises(W.MirrorMessageError, match="seq 4: not CBOR"):
        W.decode(b"\xff\x00junk", seq=4)
    with pytest.raises(W.MirrorMessageError, match="ev\\[0\\] is not \\[seq, event\\]"):
        import cbor2

        W.decode(cbor2.dumps({"v": 1, "k": "ev", "ev": [["x", {}]]}))
    with pytest.raises(W.MirrorMessageError, match="a claim needs 'by' and 'upto'"):
        import cbor2

        W.decode(cbor2.dumps({"v": 1, "k": "claim", "upto": -1}))
    with pytest.raises(W.MirrorMessageError, match="not a version 1"):
        W.decode(W.encode(W.KIND_BEAT).replace(b"\x01", b"\x02", 1))


def test_replay_starts_at_the_checkpoint_and_adoption_cuts_but_a_bare_claim_does_not():
    ev = [(1, _owe(1)), (2, _owe(2)), (3, {"e": EV_TRY, "id": "s2", "n": 2, "age": 1.5})]
    r = W.replay(_msgs((W.KIND_EVENTS, ev), (W.KIND_BEAT,), (W.KIND_EVENTS, [(4, _owe(3))])))
    assert [s for s, _ in r.events] == [1, 2, 3, 4] and r.top_seq == 4 and not r.settled
    # a checkpoint replaces what came before it
    r = W.replay(_msgs((W.KIND_EVENTS, ev), (W.KIND_CHECKPOINT, [(2, _owe(2))]), (W.KIND_EVENTS, [(5, _owe(5))])))
    assert [s for s, _ in r.events] == [2, 5]
    # a claim alone cuts nothing (its claimer is adopting, or died before it adopted)
    r = W.replay(_msgs((W.KIND_EVENTS, ev), (W.KIND_CLAIM, {"by": "b", "upto": 3})))
    assert [s for s, _ in r.events] == [1, 2, 3] and r.last_kind == "claim" and not r.settled
    # adopted: settled; what the owner journals after it is its own again
    msgs = _msgs((W.KIND_EVENTS, ev), (W.KIND_CLAIM, {"by": "b", "upto": 3}), (W.KIND_ADOPTED, {"by": "b", "upto": 3}))
    r = W.replay(msgs)
    assert r.settled and r.events == [] and (r.claimed_by, r.claimed_upto) == ("b", 3)
    r = W.replay(msgs + _msgs((W.KIND_EVENTS, [(2, _owe(2)), (8, _owe(8))])))
    assert [s for s, _ in r.events] == [8] and not r.settled
    # an undecodable message is skipped and counted, never folded
    r = W.replay([W.MirrorMessageError("x", seq=1), *_msgs((W.KIND_EVENTS, ev))])
    assert r.skipped == 1 and len(r.events) == 3


def test_checkpoint_keeps_each_open_saga_owe_and_last_try_so_it_folds_to_the_same_state():
    events = [(1, _owe(1)), (2, {"e": EV_TRY, "id": "s1", "n": 1, "age": 1.0}),
              (3, {"e": EV_TRY, "id": "s1", "n": 2, "age": 3.0}), (4, _owe(2)),
              (5, {"e": EV_END, "id": "s2", "how": "answered"}), (6, _owe(3))]  # fmt: skip
    before = fold(events)
    pairs = W.checkpoint_events(before.sagas.values(), before.tickets)
    assert [s for s, _ in pairs] == [1, 3, 6]
    after = fold(pairs)
    assert {k: (s.attempts, s.age_base) for k, s in after.sagas.items()} == {"s1": (2, 3.0), "s3": (0, 0.0)}


def test_a_checkpoint_too_big_for_one_message_is_cut_in_parts_that_replay_to_the_same_state():
    pairs = [(i, _owe(i)) for i in range(1, 41)]
    parts = W.split_events(pairs, 512, "rack-a-1")
    assert len(parts) > 3 and [p for part in parts for p in part] == pairs
    for i, part in enumerate(parts):
        assert len(W.encode(W.KIND_CHECKPOINT_PART, part, ref="rack-a-1", index=i)) <= 512
    assert W.split_events([(1, {"big": "x" * 2000})], 512, "r") is None  # one event alone too big
    ref = (W.KIND_CHECKPOINT_REF, {"ref": "rack-a-1", "slot": 1, "parts": len(parts)})
    msgs = _msgs((W.KIND_EVENTS, [(0, _owe(0))]), ref, (W.KIND_EVENTS, [(50, _owe(50))]))
    r = W.replay(msgs)  # the parts not read yet: the reader is told which
    assert r.missing is not None and (r.missing.ref, r.missing.slot, r.missing.parts) == ("rack-a-1", 1, len(parts))
    assert [s for s, _ in r.events] == [50]
    r = W.replay(msgs, {"rack-a-1": [p for part in parts for p in part]})
    assert r.missing is None and [s for s, _ in r.events] == [*range(1, 41), 50] and r.top_seq == 50
    # a later plain checkpoint needs no parts
    r = W.replay(msgs + _msgs((W.KIND_CHECKPOINT, [(51, _owe(51))])))
    assert r.missing is None and [s for s, _ in r.events] == [51]
    with pytest.raises(W.MirrorMessageError, match="slot' 0 or 1"):
        W.decode(W.encode(W.KIND_CHECKPOINT_REF, ref="r", slot=2, parts=1))
    with pytest.raises(W.MirrorMessageError, match="needs 'ref'"):
        W.decode(W.encode(W.KIND_CHECKPOINT_PART, [], index=0))


def test_lease_expires_a_subject_that_stands_still_on_the_watchers_clock():
    lease = W.Lease(lease_s=10)
    lease.observe("a", 5, now=100.0)
    lease.observe("b", 7, now=100.0)
    lease.observe("a", 6, now=105.0)  # a moved
    assert lease.expired(109.0) == [] and lease.expired(110.0) == ["b"]
    assert lease.expired(115.0) == ["b", "a"] and lease.last_seq("a") == 6
    lease.observe("b", 7, now=200.0)  # the same seq seen again is no news
    assert lease.still_for("b", 200.0) == 100.0


# -- against a real nats-server --------------------------------------------------------------
class Member:
    """One member's conductor sagas: a real journal, Reversals, and its mirror on the bus.
    `emit` collects what it would send to its issuer leg `out_iss` (the leg is down at first)."""

    def __init__(self, name: str, tmp, key_file: str, nc, lease_s: float = 2.0, **mirror_kw):
        self.name, self.dir, self.key_file, self.nc, self.lease_s = name, str(tmp / name), key_file, nc, lease_s
        self.mirror_kw = mirror_kw
        self.sent: list[FluxMsg] = []
        self.up = False
        self.rev: Reversals | None = None
        self.mirror: SagaMirror | None = None

    async def start(self) -> None:
        store = await SagaStore.open(self.dir, self.key_file)

        async def emit(_port, msg):
            self.sent.append(msg)

        def reply_key(mti, fields):
            return ("saga", mti[:2], fields.get("11"))

        self.rev = Reversals(GEAR, store, SagaSettings(backoff_initial=0.3, backoff_cap=0.3), emit,
                             lambda _p: self.up, lambda _r, _l: None, reply_key)  # fmt: skip
        js = self.nc.jetstream()
        self.mirror = SagaMirror(JsSafBus(lambda: js, S.saf_stream(GROUP)), GROUP, GEAR, self.name, store.seal,
                                 lambda sagas, _tickets, owner: self.rev.adopt(sagas, owner), self.rev.hand_over,
                                 self.rev.open_state, lease_s=self.lease_s,
                                 beat_s=0.5, check_s=0.3, checkpoint_messages=20, **self.mirror_kw)  # fmt: skip
        store.mirror = self.mirror
        self.mirror.start()
        assert await self.mirror.reconciled(10.0)
        self.rev.start()

    async def owe(self, n: int, first_stan: int = 100) -> list[Saga]:
        owed = []
        for i in range(n):
            req = FluxMsg(meta={M.ISO_MTI: "0200"}, data={"iso8583": {"field": {
                "0": "0200", "2": PAN, "3": "000000", "4": "000000001000", "7": "1203120000",
                "11": f"{first_stan + i:06d}", "41": "TERM0001"}}})  # fmt: skip
            owed.append(OwedReversal("main", ReversalPolicy(), req, "out_iss", "timeout"))
        return await self.rev.owe(owed)

    async def die(self) -> None:
        """SIGKILL as the stream sees it: every task stops, nothing more is written anywhere."""
        await self.mirror.stop()
        for t in (self.rev._pump, self.rev._sender):
            t.cancel()
        await asyncio.gather(self.rev._pump, self.rev._sender, return_exceptions=True)
        await self.rev.store.close()

    async def stop(self) -> None:
        await self.mirror.stop()
        await self.rev.stop()


async def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def snake(tmp_path):
    from fluxrig_mixer.streams import ensure_stream, saf_stream_config

    c = NatsCluster(str(tmp_path), 1)
    await c.start_all()
    nc = await nats.connect(c.url(0), connect_timeout=2)
    await ensure_stream(nc.jetstream(), saf_stream_config(GROUP, 1))
    yield nc
    await nc.close()
    await c.stop()


def _key(tmp_path, name="group.key") -> str:
    path = str(tmp_path / name)
    FieldSeal.load(path)  # created 0600 when absent: the group's members share this file
    return path


@pytest.mark.mixer
@pytest.mark.timeout(120)
async def test_a_silent_members_reversals_are_claimed_resumed_and_handed_over_when_it_returns(snake, tmp_path):
    key = _key(tmp_path)
    a, b = Member("rack-a", tmp_path, key, snake), Member("rack-b", tmp_path, key, snake)
    await a.start()
    await b.start()
    owed = await a.owe(3)
    assert len(owed) == 3
    # attempts made on A before it dies: the leg comes up, each reversal is sent, no answer
    a.up = True
    await _wait(lambda: len(a.sent) >= 6, 10, "two attempts of each reversal on rack-a")
    a.up = False
    attempts = {s.id: s.attempts for s in a.rev.open_sagas()}
    await asyncio.sleep(0.3)  # the last tries reach the stream
    await a.die()
    t_dead = time.monotonic()
    await _wait(lambda: b.rev.stats["adopted"] == 3, 30, "rack-b adopting rack-a's reversals")
    claim_s = time.monotonic() - t_dead
    assert claim_s < a.lease_s + 5, claim_s  # the lease (2 s here; 15 s in a Rack) plus a check
    mine = {s.id: s for s in b.rev.open_sagas()}
    assert set(mine) == set(attempts)
    for sid, n in attempts.items():
        assert mine[sid].attempts >= n - 1 and mine[sid].attempts >= 1, (sid, n, mine[sid].attempts)
        assert mine[sid].fields["2"] == PAN  # opened with the group's shared key
    b.up = True  # b's own leg to the same issuer: repeats (0421... here 0401), same STAN and DE 90
    await _wait(lambda: len(b.sent) >= 3, 10, "rack-b resending the adopted reversals")
    assert {m.meta[M.ISO_MTI] for m in b.sent} == {"0401"}
    by_id = {s.id: s for s in owed}
    assert {m.data["iso8583"]["field"]["11"] for m in b.sent} == {s.stan for s in by_id.values()}
    assert b.mirror.stats["claims"] == 1 and b.mirror.stats["adopted"] == 3
    # B's journal holds them (a restart of B resumes them): fold it without the running store
    from fluxrig.saga.store import read_journal

    assert set(read_journal(b.dir).sagas) == set(attempts)
    # A comes back: it hands them over and sends nothing
    a2 = Member("rack-a", tmp_path, key, snake)
    a2.up = True
    await a2.start()
    assert a2.rev.stats["recovered"] == 3 and a2.rev.stats["handed_over"] == 3
    assert a2.rev.open_count() == 0
    await asyncio.sleep(1.0)
    assert a2.sent == []
    # and a third member never claims rack-a again (settled), nor the live rack-b
    c = Member("rack-c", tmp_path, key, snake)
    await c.start()
    await asyncio.sleep(3 * c.lease_s)
    assert c.rev.stats["adopted"] == 0 and c.mirror.stats["claims"] == 0
    for m in (a2, b, c):
        await m.stop()


@pytest.mark.mixer
@pytest.mark.timeout(120)
async def test_a_live_member_is_never_claimed_and_a_claimer_without_the_key_refuses(snake, tmp_path):
    key = _key(tmp_path)
    a, b = Member("rack-a", tmp_path, key, snake), Member("rack-b", tmp_path, key, snake)
    other = Member("rack-x", tmp_path, _key(tmp_path, "other.key"), snake)
    for m in (a, b, other):
        await m.start()
    await a.owe(2)
    await asyncio.sleep(4 * a.lease_s)  # a beats: nobody claims it
    assert b.mirror.stats["claims"] == 0 and other.mirror.stats["claims"] == 0
    assert a.rev.open_count() == 2
    await a.die()
    await _wait(lambda: b.rev.stats["adopted"] == 2 or other.mirror.stats["claims_refused"] > 0, 30, "a claim")
    await _wait(lambda: b.rev.stats["adopted"] == 2, 30, "rack-b adopting (rack-x cannot open the PANs)")
    assert other.rev.stats["adopted"] == 0 and other.mirror.stats["claims"] == 0
    for m in (b, other):
        await m.stop()


@pytest.mark.mixer
@pytest.mark.timeout(120)
async def test_the_checkpoint_compacts_the_subject_and_a_restarted_owner_restates_what_it_owes(snake, tmp_path):
    key = _key(tmp_path)
    a = Member("rack-a", tmp_path, key, snake)
    await a.start()
    await a.owe(5)
    await asyncio.sleep(3 * 0.5 * 20 / 10)  # beats reach checkpoint_messages (20) quickly enough
    await _wait(lambda: a.mirror.stats["checkpoints"] >= 1, 20, "a checkpoint")
    js = snake.jetstream()
    info = await js.stream_info(S.saf_stream(GROUP), subjects_filter=S.saf_subject(GROUP, GEAR, "rack-a"))
    assert sum((info.state.subjects or {}).values()) < 20  # rolled up, not every beat since
    await a.stop()
    # a restart: its first word restates the 5 open reversals, so a later rollup keeps them
    a2 = Member("rack-a", tmp_path, key, snake)
    await a2.start()
    await _wait(lambda: a2.mirror.stats["checkpoints"] >= 1, 20, "the restart's checkpoint")
    bus = JsSafBus(lambda: js, S.saf_stream(GROUP))
    got, seq = [], 1
    while (m := await bus.next(S.saf_subject(GROUP, GEAR, "rack-a"), seq)) is not None:
        got.append(W.decode(m[1], m[0]))
        seq = m[0] + 1
    assert len(fold(W.replay(got).events).sagas) == 5
    await a2.stop()
    assert os.path.isdir(a2.dir)


@pytest.mark.mixer
@pytest.mark.timeout(120)
async def test_shared_tickets_wait_for_the_stream_and_are_refused_when_it_is_gone(snake, tmp_path):
    """share_tickets: a request's `open` and its reply's `close` resolve only once the stream
    holds them; with the bus gone they raise MirrorUnavailable (on disk all the same), so the
    conductor neither sends nor delivers what a survivor could not see."""
    from fluxrig.saga.mirror import MirrorUnavailable

    key = _key(tmp_path)
    store = await SagaStore.open(str(tmp_path / "t"), key)
    js = snake.jetstream()
    live = {"up": True}
    bus = JsSafBus(lambda: js if live["up"] else None, S.saf_stream(GROUP))

    async def emit(_p, _m):
        pass

    rev = Reversals(
        GEAR, store, SagaSettings(), emit, lambda _p: True, lambda _r, _l: None, lambda m, f: (m, f.get("11"))
    )
    mirror = SagaMirror(bus, GROUP, GEAR, "rack-t", store.seal, lambda *_a: 0, rev.hand_over, rev.open_state,
                        beat_s=0.5, check_s=0.3, share_tickets=True, owe_wait=0.5)  # fmt: skip
    store.mirror = mirror
    mirror.start()
    assert await mirror.reconciled(10)
    req = FluxMsg(meta={M.ISO_MTI: "0200"}, data={"iso8583": {"field": {"0": "0200", "2": PAN, "11": "000001"}}})
    seq = await rev.stage_ticket("main", "out_iss", req)
    assert mirror.stats["events"] >= 1  # in the stream before the future resolved
    await rev.close_ticket(seq)
    live["up"] = False
    with pytest.raises(MirrorUnavailable, match="did not take journal event") as refused:
        await rev.stage_ticket("main", "out_iss", req)
    assert mirror.stats["unshared"] == 1
    await rev.close_ticket(refused.value.seq, strict=False)  # what the conductor does: never sent
    live["up"] = True
    seq2 = await rev.stage_ticket("main", "out_iss", req)
    live["up"] = False
    with pytest.raises(MirrorUnavailable):
        await rev.close_ticket(seq2)
    live["up"] = True
    # what could not be shared is published when the stream is back, in journal order
    await _wait(lambda: not mirror._buffer, 10, "the backlog published")
    got, s = [], 1
    while (m := await bus.next(S.saf_subject(GROUP, GEAR, "rack-t"), s)) is not None:
        got.append(W.decode(m[1], m[0]))
        s = m[0] + 1
    assert fold(W.replay(got).events).tickets == {}  # every request closed, as on disk
    await mirror.stop()
    await rev.stop()


@pytest.mark.mixer
@pytest.mark.timeout(60)
async def test_a_reload_that_stops_sharing_tickets_takes_the_open_ones_off_the_subject(snake, tmp_path):
    """A request shared open, then the conductor reloaded with share_tickets off: its reply
    will not be shared, so the open ticket must leave the subject (else a claimer reverses a
    delivered approval): a checkpoint without tickets is published at once."""
    store = await SagaStore.open(str(tmp_path / "t"), _key(tmp_path))
    js = snake.jetstream()
    bus = JsSafBus(lambda: js, S.saf_stream(GROUP))

    async def emit(_p, _m):
        pass

    rev = Reversals(
        GEAR, store, SagaSettings(), emit, lambda _p: True, lambda _r, _l: None, lambda m, f: (m, f.get("11"))
    )
    mirror = SagaMirror(bus, GROUP, GEAR, "rack-t", store.seal, lambda *_a: 0, rev.hand_over, rev.open_state,
                        beat_s=0.5, check_s=0.3, share_tickets=True)  # fmt: skip
    store.mirror = mirror
    mirror.start()
    assert await mirror.reconciled(10)
    req = FluxMsg(meta={M.ISO_MTI: "0200"}, data={"iso8583": {"field": {"0": "0200", "2": PAN, "11": "000001"}}})
    await rev.stage_ticket("main", "out_iss", req)

    async def tickets_on_subject() -> dict:
        got, s = [], 1
        while (m := await bus.next(S.saf_subject(GROUP, GEAR, "rack-t"), s)) is not None:
            got.append(W.decode(m[1], m[0]))
            s = m[0] + 1
        return fold(W.replay(got).events).tickets

    assert len(await tickets_on_subject()) == 1
    before = mirror.stats["checkpoints"]
    mirror.rebind(mirror._adopt, share_tickets=False, owe_wait=0.5)
    await _wait(lambda: mirror.stats["checkpoints"] > before, 5, "the checkpoint without tickets")
    assert await tickets_on_subject() == {}
    await mirror.stop()
    await rev.stop()


@pytest.mark.mixer
@pytest.mark.timeout(120)
async def test_a_checkpoint_in_parts_keeps_the_subject_compact_and_a_claim_reads_every_saga(snake, tmp_path):
    """Thousands of owed reversals (an issuer down for a while) made a checkpoint above the
    message size, which was then never published: the subject grew with every event until
    the group's stream was full. Scaled down (2 KiB messages, 30 sagas): the checkpoint goes
    in parts, the subject stays compact, a survivor claims all 30 from the parts; an owner
    killed while writing the next checkpoint's parts (the other slot) leaves the last one
    whole."""
    key = _key(tmp_path)
    a = Member("rack-a", tmp_path, key, snake, max_message_bytes=2048, checkpoint_s=1.0)
    b = Member("rack-b", tmp_path, key, snake, max_message_bytes=2048)
    await a.start()
    await b.start()
    await a.owe(30)
    # two checkpoints in parts, so the two slots took turns
    await _wait(lambda: min(a.mirror._slot_parts) > 0, 30, "two checkpoints in parts")
    assert min(a.mirror._slot_parts) >= 2  # each more than one part
    js = snake.jetstream()
    subject = S.saf_subject(GROUP, GEAR, "rack-a")
    info = await js.stream_info(S.saf_stream(GROUP), subjects_filter=subject)
    assert sum((info.state.subjects or {}).values()) < 20  # rolled up, not every event and beat since
    # a's next checkpoint, half written when it dies: a part of another ref in the slot not in use
    slot = 1 - a.mirror._cp_slot
    await js.publish(S.saf_checkpoint_part(subject, slot, 0), W.encode(W.KIND_CHECKPOINT_PART, [], ref="x", index=0),
                     headers={"Nats-Rollup": "sub"})  # fmt: skip
    await a.die()
    await _wait(lambda: b.rev.stats["adopted"] == 30, 30, "rack-b adopting all 30 from the parts")
    assert b.mirror.stats["claims"] == 1 and b.mirror.stats["claims_refused"] == 0
    assert {s.fields["2"] for s in b.rev.open_sagas()} == {PAN}
    await b.stop()
