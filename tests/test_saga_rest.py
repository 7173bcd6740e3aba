"""What the saga journal keeps at rest (issue 16): no clear PAN on disk (sealed with the Rack's
saga key, track data and PIN blocks never written), yet a reversal rebuilt after a restart still
carries DE 2; and the STANs a conductor originates stay inside its `saf.stan_range`, survive a
restart without reuse, and come with an originated RRN when the original had none."""

from __future__ import annotations

import datetime
import os
import stat

import pytest
from helpers import running
from test_iso_switch import wait_links
from test_saga import Issuer, _drain, _saf, owing

from fluxrig.errors import ConfigError
from fluxrig.saga.ops import masked
from fluxrig.saga.reversal import ReversalPolicy, build_reversal
from fluxrig.saga.seal import FieldSeal
from fluxrig.saga.stan import StanCounter, check_range, originated_rrn
from fluxrig.saga.store import SagaStore, read_parked

PAN = "4111111111111111"
TRACK2 = "4111111111111111=2912"


def _files_holding(root: str, needles: list[bytes]) -> list[str]:
    hits = []
    for d, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as fh:
                data = fh.read()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


# -- sealed at rest -------------------------------------------------------------------------------


def test_seal_round_trips_and_refuses_a_loose_key_file(tmp_path):
    key = tmp_path / "saga.key"
    seal = FieldSeal.load(str(key))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(key.read_bytes()) == 32
    doc = {"e": "owe", "fields": {"2": PAN, "4": "000000010000"}, "trail": [{"e": "owe", "fields": {"2": PAN}}]}
    sealed = seal.seal(doc)
    assert sealed["fields"]["2"]["masked"] == "411111******1111" and PAN.encode() not in repr(sealed).encode()
    assert sealed["fields"]["4"] == "000000010000" and doc["fields"]["2"] == PAN  # the input is untouched
    assert FieldSeal.load(str(key)).open(sealed) == doc  # the same key from the file opens it
    assert masked(sealed)["fields"]["2"] == "411111******1111"  # readable without the key, masked
    other = FieldSeal(os.urandom(32))
    assert "2" not in other.open(sealed)["fields"] and other.unopened == 2  # lost key: left out, counted
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        FieldSeal.load(str(key))


async def test_no_clear_pan_on_disk_and_the_reversal_still_carries_it_after_a_restart(tmp_path):
    """Reversals owed while the issuer is away (journal: owe events and open tickets) and one
    parked: grep every file the switch wrote for the PAN and the track data; then restart with
    the issuer back: the reversals it receives carry DE 2 in clear on the wire."""
    async with owing(tmp_path, ["000001", "000002", "000003"]) as (sw, saga_dir, issuer, text):
        rev = sw.gears["switch"].reversals
        assert rev.open_count() == 3
        victim = next(iter(rev.queues["out_issuer_a"].sagas))
        assert await rev.park(victim, "settled by phone")
    hits = _files_holding(str(tmp_path), [PAN.encode(), TRACK2.encode(), PAN.encode().hex().encode()])
    assert not hits, hits
    assert read_parked(saga_dir)[0]["fields"]["2"]["masked"] == "411111******1111"
    code, out, err = _saf("show", victim, "--dir", saga_dir)  # the CLI needs no key to show it
    assert code == 0 and "411111******1111" in out and PAN not in out, (out, err)
    key = os.path.join(saga_dir, "saga.key")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    issuer2 = Issuer(issuer.port)
    issuer2.ledger = issuer.ledger
    seen = []
    orig_handle = issuer2._handle

    async def spy(doc, writer):
        if doc["t"] in ("0400", "0401"):
            seen.append(doc.get("2"))
        await orig_handle(doc, writer)

    issuer2._handle = spy
    await issuer2.start()
    try:
        async with running(text) as sw:
            await wait_links(sw, 1)
            m = await _drain(sw)
    finally:
        await issuer2.stop()
    assert m["saf_recovered"] == 2 and m["saf_answered"] == 2, m
    assert seen == [PAN, PAN]  # rebuilt from the sealed journal: DE 2 in clear on the wire only


# -- STAN range and RRN ---------------------------------------------------------------------------


def test_stan_range_is_checked():
    assert check_range(None) == (1, 999_999)
    assert check_range([500_000, 599_999]) == (500_000, 599_999)
    for bad in ([0, 10_000], [10, 5], [1, 1_000_000], [1, 50], "1-999", [1.0, 500.0]):
        with pytest.raises(ConfigError, match="saf.stan_range"):
            check_range(bad)


def test_stans_cycle_in_their_range_and_a_restart_never_reuses_one(tmp_path):
    path = str(tmp_path / "stan.json")
    c = StanCounter(path, 200_000, 200_249, block=100)
    first = [c.next() for _ in range(150)]
    assert first == list(range(200_000, 200_150)) and c.reservations == 2
    c2 = StanCounter(path, 200_000, 200_249, block=100)  # a restart (or a crash) after 150
    after = [c2.next() for _ in range(150)]
    assert not set(after) & set(first[-50:])  # the second block's unused STANs are skipped, none reused
    assert after[:50] == list(range(200_200, 200_250)) and after[50] == 200_000  # ... then it cycles
    assert all(200_000 <= s <= 200_249 for s in after)
    c3 = StanCounter(path, 300_000, 300_999, block=100)  # another range: starts at its first STAN
    assert c3.next() == 300_000


def test_reversal_originates_an_rrn_when_the_original_has_none():
    now = datetime.datetime(2026, 12, 2, 7, 30, tzinfo=datetime.UTC)
    original = {"2": PAN, "4": "000000010000", "11": "000042", "7": "1202073000"}
    rev = build_reversal(ReversalPolicy(), "0200", original, 512_345, "timeout", now)
    assert rev["37"] == originated_rrn(now, 512_345) == "633607512345" and len(rev["37"]) == 12
    rev = build_reversal(ReversalPolicy(), "0200", {**original, "37": "RRN000000001"}, 7, "timeout", now)
    assert rev["37"] == "RRN000000001"  # the original's, which the issuer matches on
    assert "37" not in build_reversal(ReversalPolicy(copy_fields=(4,)), "0200", original, 7, "timeout", now)


async def test_two_switches_with_disjoint_ranges_never_share_a_stan(tmp_path):
    """Two conductors (two Racks of a group) owing reversals at once: each stays in its range."""
    stans = {}
    for name, rng in (("r1", (100_000, 199_999)), ("r2", (200_000, 299_999))):
        async with owing(tmp_path, [f"{i:06d}" for i in range(1, 21)], name, rng) as (sw, _d, _i, _t):
            sagas = sw.gears["switch"].reversals.queues["out_issuer_a"].sagas.values()
            stans[name] = {int(s.stan) for s in sagas}
            assert all(len(s.rrn) == 12 for s in sagas)
        store = await SagaStore.open(str(tmp_path / name))
        await store.close()
    assert len(stans["r1"]) == 20 and all(100_000 <= s <= 199_999 for s in stans["r1"])
    assert len(stans["r2"]) == 20 and all(200_000 <= s <= 299_999 for s in stans["r2"])
