"""Reversals (issue 16): the sans-IO builder and scheduler, and the switch end to end against an
independent issuer written here with pyiso8583 (not our codec) that drops, delays and answers
late, keeping a ledger of what it approved and what was reversed."""

import asyncio
import contextlib
import datetime
import json
import random

import iso8583
import pytest
from helpers import free_port, running
from test_iso_authorizer import SPEC, request
from test_iso_switch import switch_text, wait_links

from fluxrig.saga.reversal import ReversalPolicy, build_reversal, original_data_elements
from fluxrig.saga.saf import EV_CLOSE, EV_END, EV_OPEN, EV_OWE, EV_TRY, SafQueue, Saga, backoff, fold
from fluxrig.saga.store import SagaStore, read_parked

NOW = datetime.datetime(2026, 12, 1, 23, 59, 58, tzinfo=datetime.UTC)
ORIGINAL = {
    "2": "4111111111111111",
    "3": "000000",
    "4": "000000010000",
    "7": "1201235950",
    "11": "000042",
    "32": "12345",
    "35": "4111111111111111=2912",
    "41": "TERM0001",
    "49": "978",
    "52": "00FF00FF00FF00FF",
}


# -- the builder ------------------------------------------------------------------------------
def test_reversal_carries_the_original_data_elements_and_a_new_stan():
    rev = build_reversal(ReversalPolicy(), "0200", ORIGINAL, 7, "timeout", NOW)
    assert rev["0"] == "0400" and rev["11"] == "000007" and rev["39"] == "68"
    assert rev["90"] == "0200" + "000042" + "1201235950" + "00000012345" + "00000000000"
    assert len(rev["90"]) == 42
    assert rev["4"] == ORIGINAL["4"] and rev["49"] == "978" and rev["2"] == ORIGINAL["2"]
    assert rev["7"] == "1201235958"
    assert "35" not in rev and "52" not in rev  # track data and PIN blocks never travel in a reversal


def test_policy_per_route_reason_codes_advice_and_refused_config():
    policy = ReversalPolicy.from_config(
        {"mti": "0420", "reason_codes": {"link_lost": "22"}, "copy_fields": [4, 35, 41]}
    )
    rev = build_reversal(policy, "0100", ORIGINAL, 999_999, "link_lost", NOW)
    assert rev["0"] == "0420" and rev["39"] == "22" and set(rev) == {"0", "4", "7", "11", "39", "41", "90"}
    assert ReversalPolicy.from_config({"enabled": False}) is None
    assert original_data_elements("0100", {})[:4] == "0100"
    with pytest.raises(Exception, match="reversal.when"):
        ReversalPolicy.from_config({"when": ["sometimes"]})
    with pytest.raises(Exception, match="reversal.mti"):
        ReversalPolicy.from_config({"mti": "0200"})


# -- the scheduler ----------------------------------------------------------------------------
def _saga(i: int, queue="out_a") -> Saga:
    return Saga({"e": EV_OWE, "id": f"s{i}", "queue": queue, "mti": "0400", "fields": {"11": f"{i:06d}"}, "wall": i})


def test_backoff_doubles_to_its_cap():
    assert [backoff(n) for n in (1, 2, 3, 4, 7, 8, 50)] == [1, 2, 4, 8, 60, 60, 60]


def test_window_bounds_what_is_in_flight_and_the_oldest_goes_first():
    q = SafQueue("out_a", window=3)
    for i in range(10):
        q.add(_saga(i), now=0.0)
    first = q.due(0.0)
    assert [s.id for s in first] == ["s0", "s1", "s2"]
    for s in first:
        q.sent(s, 0.0)
    assert q.due(0.5) == []  # the window is full
    q.answered("s1")
    assert [s.id for s in q.due(0.5)] == ["s3"]


def test_unanswered_is_repeated_on_backoff_with_the_repeat_mti():
    q = SafQueue("out_a", window=4)
    s = _saga(1)
    q.add(s, 0.0)
    assert s.wire_mti() == "0400"
    (got,) = q.due(0.0)
    q.sent(got, 0.0)
    assert q.unanswered(0.9) == [] and q.unanswered(1.0) == [s]
    (again,) = q.due(1.0)
    assert again.wire_mti() == "0401"
    q.sent(again, 1.0)
    assert q.unanswered(2.9) == [] and q.unanswered(3.0) == [s]  # 2 s after the second attempt


def test_a_poison_reversal_is_parked_without_delaying_the_others():
    q = SafQueue("out_a", window=2, max_attempts=3)
    q.add(_saga(0), 0.0)  # the poison, oldest
    for i in range(1, 6):
        q.add(_saga(i), 0.0)
    now, parked, answered = 0.0, False, []
    for _ in range(200):
        for s in q.due(now):
            q.sent(s, now)
            if s.id == "s0":
                parked = q.refused("s0", now) or parked
                if parked:
                    q.remove("s0")
            else:
                q.answered(s.id)
                answered.append((s.id, now))
        if parked and len(answered) == 5:
            break
        q.unanswered(now)
        now += 0.1
    assert parked and len(answered) == 5
    assert max(t for _, t in answered) < 0.5, answered  # nobody waited for the poison's back-off


def test_fold_resumes_attempts_and_turns_open_requests_into_debts():
    events = [
        (1, {"e": EV_OPEN, "route": "r", "leg": "out_a", "mti": "0200", "fields": {"11": "000001"}}),
        (2, {"e": EV_OPEN, "route": "r", "leg": "out_a", "mti": "0200", "fields": {"11": "000002"}}),
        (3, {"e": EV_CLOSE, "s": 2}),
        (4, {"e": EV_OWE, "id": "x", "queue": "out_a", "mti": "0400", "fields": {"11": "000900"}, "ticket": 1}),
        (5, {"e": EV_TRY, "id": "x", "n": 1, "age": 0.5}),
        (6, {"e": EV_TRY, "id": "x", "n": 2, "age": 1.5}),
        (7, {"e": EV_OPEN, "route": "r", "leg": "out_b", "mti": "0200", "fields": {"11": "000003"}}),
        (8, {"e": EV_OWE, "id": "y", "queue": "out_a", "mti": "0400", "fields": {"11": "000901"}}),
        (9, {"e": EV_END, "id": "y", "how": "answered"}),
        (10, {"e": EV_TRY, "id": "gone", "n": 1}),
    ]
    folded = fold(events)
    assert list(folded.sagas) == ["x"] and folded.sagas["x"].attempts == 2 and folded.sagas["x"].age_base == 1.5
    assert folded.sagas["x"].wire_mti() == "0401"  # the next one is a repeat
    assert list(folded.tickets) == [7]
    assert sorted(folded.finished) == [1, 2, 3, 8, 9, 10]
    assert folded.top_stan == 901


# -- the independent issuer -------------------------------------------------------------------
class Issuer:
    """An issuer host on loopback, pyiso8583 only: approves every 0200, keeps a ledger by
    (STAN, terminal), answers reversals 0410 (39=00 found, 25 unknown). `drop`/`late` shares
    of 0200s are approved but answered never / after `late_by`; `drop_first_reversal` leaves
    the first attempt of each reversal unanswered (so the switch must repeat it, 0401);
    `poison` STANs' reversals are always answered 39=30 (format error)."""

    def __init__(
        self, port, drop=0.0, late=0.0, late_by=0.6, drop_first_reversal=False, poison=(), seed=16, answer_after=0.0
    ):
        self.port = port
        self.answer_after = answer_after  # seconds before a reversal is answered
        self.unanswered = 0
        self.most_unanswered = 0
        self.drop, self.late, self.late_by = drop, late, late_by
        self.drop_first_reversal = drop_first_reversal
        self.poison = set(poison)
        self.rng = random.Random(seed)
        self.ledger: dict[tuple, dict] = {}
        self.reversals: list[dict] = []
        self.server = None
        self.writers = []

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self):
        self.server.close()
        for w in self.writers:
            w.close()

    def _send(self, writer, doc):
        raw, _ = iso8583.encode(doc, SPEC)
        writer.write(len(raw).to_bytes(2, "big") + bytes(raw))

    async def _serve(self, reader, writer):
        self.writers.append(writer)
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                doc, _ = iso8583.decode(await reader.readexactly(n), SPEC)
                await self._handle(doc, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def _handle(self, doc, writer):
        mti = doc["t"]
        if mti in ("0200", "0100"):
            key = (doc["11"], doc.get("41", ""))
            fate = self.rng.random()
            how = "dropped" if fate < self.drop else "late" if fate < self.drop + self.late else "answered"
            self.ledger[key] = {"approved": True, "how": how, "reversals": [], "amount": doc.get("4")}
            reply = {k: v for k, v in doc.items() if k not in ("p", "1", "b")}
            reply.update({"t": mti[:2] + "10", "39": "00", "38": "AUTH01"})
            if how == "answered":
                self._send(writer, reply)
            elif how == "late":
                asyncio.get_running_loop().call_later(self.late_by, self._send, writer, reply)
        elif mti in ("0400", "0401"):
            de90 = doc.get("90", "")
            entry = self.ledger.get((de90[4:10], doc.get("41", "")))
            self.reversals.append({"mti": mti, "stan": doc["11"], "original": de90, "found": entry is not None})
            if entry is not None:
                entry["reversals"].append(mti)
            if self.drop_first_reversal and mti == "0400":
                return
            code = "30" if de90[4:10] in self.poison else "00" if entry is not None else "25"
            reply = {k: v for k, v in doc.items() if k not in ("p", "1", "b")}
            reply.update({"t": "0410", "39": code})
            if not self.answer_after:
                self._send(writer, reply)
                return
            self.unanswered += 1
            self.most_unanswered = max(self.most_unanswered, self.unanswered)
            asyncio.get_running_loop().call_later(self.answer_after, self._answer_later, writer, reply)

    def _answer_later(self, writer, reply):
        self.unanswered -= 1
        self._send(writer, reply)


async def _drain(sw, timeout=20.0):
    gear = sw.gears["switch"]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        m = gear.metrics()
        if m.get("saf_open", 0) == 0 and m["open_tickets"] == 0:
            return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"reversals still open: {gear.metrics()}")


async def _approved_then_gone(port: int, issuer: "Issuer", stans: list[str]):
    """Send `stans` through the switch, wait until the issuer approved them all, then take the
    issuer away before it answers (no leg up: the switch owes and keeps the reversals). Returns
    the acquirer's writer (close it when done)."""
    _r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"".join(request("0200", s) for s in stans))
    for _ in range(300):
        if len(issuer.ledger) >= len(stans):
            break
        await asyncio.sleep(0.02)
    assert len(issuer.ledger) >= len(stans), f"the issuer saw {len(issuer.ledger)} of {len(stans)} requests"
    await issuer.stop()
    return w


@contextlib.asynccontextmanager
async def owing(tmp_path, stans: list[str], name: str = "saga", stan_range: tuple[int, int] | None = None):
    """A running switch that owes a reversal for each of `stans` (approved, then the issuer
    gone: no leg up, so they wait in its queue); yields (switch, saga dir, the issuer, the
    scenario text: a restart runs it again with an issuer on the same port). The acquirer's
    connection is closed on the way out, inside the switch's run."""
    port, a, b = free_port(), free_port(), free_port()
    saga_dir = str(tmp_path / name)
    issuer = Issuer(a, drop=1.0)
    await issuer.start()
    text = switch_text(port, a, b, ttl="200ms", saga_dir=saga_dir, backoff="100ms")
    if stan_range:
        text = text.replace("window: 32", f"window: 32\n        stan_range: [{stan_range[0]}, {stan_range[1]}]")
    async with running(text) as sw:
        await wait_links(sw, 1)
        w = await _approved_then_gone(port, issuer, stans)
        for _ in range(100):
            if sw.gears["switch"].metrics().get("saf_open") == len(stans):
                break
            await asyncio.sleep(0.05)
        try:
            yield sw, saga_dir, issuer, text
        finally:
            w.close()


async def _acquire(port: int, stans: list[str]) -> dict[str, dict]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"".join(request("0200", s) for s in stans))
    out = {}
    for _ in stans:
        n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 10), "big")
        doc, _ = iso8583.decode(await r.readexactly(n), SPEC)
        out[doc["11"]] = doc
    w.close()
    return out


async def test_every_approval_the_acquirer_never_heard_is_reversed_exactly_once(tmp_path):
    port, a, b = free_port(), free_port(), free_port()
    issuer = Issuer(a, drop=0.25, late=0.2, late_by=0.6, drop_first_reversal=True)
    await issuer.start()
    try:
        text = switch_text(port, a, b, ttl="300ms", saga_dir=str(tmp_path / "saga"), backoff="100ms")
        async with running(text) as sw:
            await wait_links(sw, 1)
            stans = [f"{i:06d}" for i in range(1, 121)]
            answers = await _acquire(port, stans)
            m = await _drain(sw)
        approved_heard = {s for s, d in answers.items() if d["39"] == "00"}
        for (stan, _term), entry in issuer.ledger.items():
            if stan in approved_heard:
                assert entry["how"] == "answered" and entry["reversals"] == [], (stan, entry)
            else:
                assert answers[stan]["39"] == "91", (stan, answers[stan])
                assert entry["reversals"][:1] == ["0400"], (stan, entry)  # one first attempt ...
                assert entry["reversals"].count("0400") == 1 and set(entry["reversals"][1:]) == {
                    "0401"
                }  # ... then repeats
        # What the switch owes: every approval the acquirer did not hear (on a loaded box some
        # replies the issuer sent in time reach the switch after its deadline: those too).
        owed = [e for (stan, _term), e in issuer.ledger.items() if stan not in approved_heard]
        assert owed and all(e["reversals"] for e in owed)
        assert all(r["found"] for r in issuer.reversals)  # no reversal without an original
        assert m["saf_owed"] == len(owed) and m["saf_answered"] == len(owed) and m["saf_parked"] == 0
    finally:
        await issuer.stop()


async def test_poison_reversal_is_parked_and_the_rest_flow(tmp_path):
    port, a, b = free_port(), free_port(), free_port()
    issuer = Issuer(a, drop=1.0, poison={"000001"})
    await issuer.start()
    try:
        text = switch_text(port, a, b, ttl="200ms", saga_dir=str(tmp_path / "saga"), backoff="50ms")
        text = text.replace("max_attempts: 10", "max_attempts: 3")
        async with running(text) as sw:
            await wait_links(sw, 1)
            await _acquire(port, [f"{i:06d}" for i in range(1, 11)])
            m = await _drain(sw)
        assert m["saf_parked"] == 1 and m["saf_answered"] == 9
        parked = read_parked(str(tmp_path / "saga"))
        assert len(parked) == 1 and parked[0]["original"][4:10] == "000001" and parked[0]["refusals"] == 3
        assert [ev["e"] for ev in parked[0]["trail"]][:2] == ["owe", "try"] and parked[0]["trail"][-1]["e"] == "end"
        assert "35" not in parked[0]["fields"]
        json.dumps(parked)  # an operator's tools can read it
    finally:
        await issuer.stop()


async def test_reversals_wait_for_a_downed_issuer_and_resume_after_a_restart(tmp_path):
    """Owed while the issuer is gone: nothing is sent and no attempt counted; the Rack stops
    (sagas on disk), starts again, and the queue drains oldest first once the issuer is back."""
    async with owing(tmp_path, [f"{i:06d}" for i in range(1, 6)]) as (sw, saga_dir, issuer, text):
        await asyncio.sleep(1.5)
        m = sw.gears["switch"].metrics()
        assert m["saf_open"] == 5 and m["saf.out_issuer_a.sent"] == 0, m  # no leg up: nothing sent, nothing counted
        assert not issuer.reversals
    store = await SagaStore.open(saga_dir)
    recovered = sorted(store.recovered.values(), key=lambda s: s.created_wall)
    await store.close()
    assert len(recovered) == m["saf_open"]
    issuer2 = Issuer(issuer.port)
    issuer2.ledger = issuer.ledger
    await issuer2.start()
    try:
        async with running(text) as sw:
            await wait_links(sw, 1)
            m2 = await _drain(sw)
        assert m2["saf_recovered"] == len(recovered) and m2["saf_answered"] == len(recovered)
        order = [r["original"][4:10] for r in issuer2.reversals]
        assert order == sorted(order)  # oldest first
        assert all(e["reversals"] for e in issuer.ledger.values())
    finally:
        await issuer2.stop()


def _saf(*args) -> tuple[int, str, str]:
    import subprocess
    import sys

    from helpers import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "saf", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return r.returncode, r.stdout, r.stderr


async def test_operator_lists_shows_and_parks_a_reversal_beside_the_running_switch(tmp_path):
    async with owing(tmp_path, ["000077"]) as (sw, saga_dir, _issuer, _text):
        loop = asyncio.get_running_loop()
        code, out, err = await loop.run_in_executor(None, _saf, "list", "--dir", saga_dir)
        assert code == 0, err
        (row,) = [json.loads(line) for line in out.splitlines()]
        assert row["original"][4:10] == "000077" and row["state"] == "waiting" and row["mti"] == "0400"
        code, out, err = await loop.run_in_executor(None, _saf, "show", row["id"], "--dir", saga_dir)
        assert code == 0 and "4111111111111111" not in out and "411111" in out, out
        assert json.loads(out)["trail"][0]["e"] == "owe"
        code, out, err = await loop.run_in_executor(
            None, _saf, "park", row["id"], "--dir", saga_dir, "--why", "settled"
        )
        assert code == 0, err
        for _ in range(100):
            if sw.gears["switch"].metrics()["saf_parked"] == 1:
                break
            await asyncio.sleep(0.05)
        assert sw.gears["switch"].metrics()["saf_parked"] == 1
    code, out, _ = _saf("list", "--dir", saga_dir, "--parked")
    (parked,) = [json.loads(line) for line in out.splitlines()]
    assert parked["id"] == row["id"] and parked["state"] == "parked"
    assert _saf("list", "--dir", saga_dir)[1] == ""
    assert _saf("retry", "nope", "--dir", saga_dir)[0] == 1


async def test_a_park_cut_off_before_its_journal_end_is_not_resumed_at_the_next_start(tmp_path):
    """park() writes parked.jsonl, then the journal's `end`: a crash between the two must not
    turn the operator's park into a reversal sent at the next start."""
    async with owing(tmp_path, ["000078"]) as (sw, saga_dir, _issuer, _text):
        rev = sw.gears["switch"].reversals
        (saga,) = rev.queues["out_issuer_a"].sagas.values()
        doc = {**saga.summary(0.0), "state": "parked", "fields": saga.fields, "trail": saga.trail}
        rev.store._write_parked(json.dumps(rev.store.seal.seal(doc), default=str) + "\n")  # the first write only
    assert [d["id"] for d in read_parked(saga_dir)] == [saga.id]
    store = await SagaStore.open(saga_dir)
    try:
        assert saga.id not in store.recovered
    finally:
        await store.close()
    assert _saf("list", "--dir", saga_dir)[1] == ""  # and its end is on disk now


async def test_a_backlog_drains_oldest_first_within_the_window(tmp_path):
    """60 reversals owed while the issuer is away; back, it answers each after 50 ms: never more
    than the window (8 here) unanswered at once, first attempts in order of age."""
    port, a, b = free_port(), free_port(), free_port()
    issuer = Issuer(a, drop=1.0)
    await issuer.start()
    # A TTL longer than it takes to send 60 requests on a loaded box: none may time out (and be
    # reversed) while the issuer is still there, nor before its request is journaled (never sent).
    text = switch_text(port, a, b, ttl="3s", saga_dir=str(tmp_path / "saga"), backoff="5s")
    text = text.replace("window: 32", "window: 8")
    async with running(text) as sw:
        await wait_links(sw, 1)
        w = await _approved_then_gone(port, issuer, [f"{i:06d}" for i in range(1, 61)])
        for _ in range(200):
            if sw.gears["switch"].metrics().get("saf_open") == 60:
                break
            await asyncio.sleep(0.05)
        back = Issuer(a, answer_after=0.05)
        back.ledger = issuer.ledger
        await back.start()
        try:
            m = await _drain(sw, timeout=30)
        finally:
            w.close()
            await back.stop()
    assert m["saf_answered"] == 60 and back.most_unanswered <= 8 and back.most_unanswered >= 4, back.most_unanswered
    firsts = [rv["original"][4:10] for rv in back.reversals if rv["mti"] == "0400"]
    assert firsts == sorted(firsts) and len(firsts) == 60
