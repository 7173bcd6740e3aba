"""Owed reversals outlive their Rack (issue 17 item 4), end to end: a real Mixer (nats-server,
DuckDB), two in-process Rack members of group `pos` running the switch with `saf.group: pos`
and one shared `saf.key_file`, and the pyiso8583 issuer of tests/test_saga.py. The issuer
approves three 0200s on member 1's leg and answers nothing (the switch declines 91 and owes
three reversals, which the issuer leaves unanswered: member 1 repeats them). Member 1 is then
stopped dead (its task cancelled: from the group's stream it falls silent, like a SIGKILL);
member 2 claims the three within the 15 s lease (+ its 2 s look), resends them on its own leg
to the same issuer as repeats, and the issuer, now answering, closes each: the ledger holds
every approval reversed. Second: requests in flight at the death (written to the issuer,
approved, no reply yet) are reversed by the survivor, which read their `open` tickets in the
group's stream (saf.share_tickets, the default)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import iso8583
import pytest
from group_fixtures import GroupRack, group_rack_config
from helpers import free_port
from mixer_fixtures import make_mixer, wait_for
from test_iso_authorizer import SPEC, request
from test_saga import Issuer

from fluxrig.saga.seal import FieldSeal

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(240)]

SWITCH = """
meta: {{name: pos-switch, version: "{version}"}}
racks:
  - {{group: pos, match: {{labels: {{role: pos}}}}}}
gears:
  - {{name: acquirer, type: io_iso8583, deploy: pos, config: {{mode: server, bind: "127.0.0.1:0", framing: len2_be}}}}
  - {{name: acq_decode, type: codec_iso8583, deploy: pos, config: {{direction: decode}}}}
  - name: switch
    type: conductor
    deploy: pos
    config:
      ttl: {ttl}
      routes: [{{name: issuer, destination: out_issuer, reversal: {{enabled: true}}}}]
      saf: {{group: pos, key_file: "{key}", backoff_initial: 300ms, backoff_cap: 600ms}}
  - {{name: iss_encode, type: codec_iso8583, deploy: pos, config: {{direction: encode}}}}
  - {{name: issuer, type: io_iso8583, deploy: pos,
     config: {{mode: client, connect: "127.0.0.1:{issuer}", framing: len2_be, idle_timeout: 0s}}}}
  - {{name: iss_decode, type: codec_iso8583, deploy: pos, config: {{direction: decode}}}}
  - {{name: decline, type: iso_responder, deploy: pos, config: {{default_code: "91", approved_codes: []}}}}
  - {{name: acq_encode, type: codec_iso8583, deploy: pos, config: {{direction: encode}}}}
wires:
  - {{from: acquirer.out, to: acq_decode.in}}
  - {{from: acq_decode.out, to: switch.in}}
  - {{from: switch.out_issuer, to: iss_encode.in}}
  - {{from: iss_encode.out, to: issuer.in}}
  - {{from: issuer.out, to: iss_decode.in}}
  - {{from: iss_decode.out, to: switch.in_reply}}
  - {{from: switch.error, to: decline.in}}
  - {{from: decline.out, to: acq_encode.in}}
  - {{from: switch.out_response, to: acq_encode.in}}
  - {{from: acq_encode.out, to: acquirer.in}}
"""

STANS = ["000101", "000102", "000103"]


@pytest.fixture
async def hub(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    try:
        yield m
    finally:
        await m.stop()


async def _activate(hub, members, text: str) -> None:
    stored, _ = hub.scenarios.import_text(text)
    await hub.controller.activate_scenario(stored)
    for m in members:
        await wait_for(lambda m=m: m.rack.agent.applied_version == stored.version, timeout=30, what=m.name)
        assert m.rack.agent.apply_state == "applied", m.rack.agent.apply_reason


async def _group(tmp_path, hub, issuer, ttl: str, reload_to: str | None = None) -> list[GroupRack]:
    """Two members running the switch; `reload_to`: then a second version with that ttl (the
    conductors are rebuilt by a hot reload and hand their journal and its mirror on)."""
    key = str(tmp_path / "pos-saga.key")
    FieldSeal.load(key)  # 0600; every member of the group is given this same file
    members = [GroupRack(group_rack_config(tmp_path, f"pos-{i}", hub, {"role": "pos"})) for i in (1, 2)]
    for m in members:
        await m.start()
    await _activate(hub, members, SWITCH.format(issuer=issuer.port, key=key, ttl=ttl, version="1"))
    await wait_for(lambda: len(issuer.writers) == 2, timeout=20, what="both members' issuer legs")
    if reload_to is not None:
        before = [m.rack.runtime.gears["switch"] for m in members]
        await _activate(hub, members, SWITCH.format(issuer=issuer.port, key=key, ttl=reload_to, version="2"))
        after = [m.rack.runtime.gears["switch"] for m in members]
        assert all(a is not b and a.mirror is not None and b.mirror is None for a, b in zip(after, before)), after
        await wait_for(lambda: len(issuer.writers) >= 2, timeout=20, what="the issuer legs after the reload")
    return members


async def _kill(member: GroupRack) -> float:
    """Dead: its task cancelled (its bus connection goes with it), then every gear stopped
    without a drain (the conductor's stop writes nothing: no saga ends, its journal just
    closes), so nothing more comes from it on any wire and no thread of it outlives the test."""
    gears = list(member.rack.runtime.gears.values())
    member.task.cancel()
    await asyncio.gather(member.task, return_exceptions=True)
    member.task = None
    t_dead = time.monotonic()
    for gear in reversed(gears):
        with contextlib.suppress(Exception):
            await gear.stop()
    return t_dead


async def test_a_dead_members_owed_reversals_are_claimed_and_answered_by_a_survivor(tmp_path, hub):
    issuer = Issuer(free_port(), drop=1.0, answer_after=3600.0)  # approves, answers nothing yet
    await issuer.start()
    members = []
    try:
        members = await _group(tmp_path, hub, issuer, "500ms")
        one, two = members
        sw1 = lambda: one.rack.runtime.gears["switch"].metrics()  # noqa: E731
        sw2 = lambda: two.rack.runtime.gears["switch"].metrics()  # noqa: E731

        port = one.rack.runtime.gears["acquirer"].endpoint.port
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"".join(request("0200", s) for s in STANS))
        declined = {}
        for _ in STANS:
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 10), "big")
            doc, _ = iso8583.decode(await r.readexactly(n), SPEC)
            declined[doc["11"]] = doc["39"]
        w.close()
        assert declined == dict.fromkeys(STANS, "91"), declined
        assert all(issuer.ledger[(s, "TERM0001")]["approved"] for s in STANS), issuer.ledger
        # member 1 owes the three and repeats them, unanswered
        await wait_for(lambda: sw1().get("saf_open") == 3 and len(issuer.reversals) >= 6, timeout=20,
                       what="member 1 sending its reversals twice")  # fmt: skip
        assert sw1()["mirror_events"] >= 3 and sw1()["mirror_late"] == 0, sw1()

        t_dead = await _kill(one)
        issuer.answer_after = 0.0  # the issuer answers from now on
        await wait_for(lambda: sw2().get("saf_adopted") == 3, timeout=40, what="member 2 adopting the reversals")
        claimed_s = time.monotonic() - t_dead
        await wait_for(lambda: sw2().get("saf_answered") == 3 and sw2().get("saf_open") == 0, timeout=20,
                       what="member 2's repeats answered")  # fmt: skip
        assert claimed_s <= 30.0, claimed_s
        for s in STANS:
            entry = issuer.ledger[(s, "TERM0001")]
            assert entry["reversals"] and set(entry["reversals"]) <= {"0400", "0401"}, entry
        # the survivor's attempts are repeats (0401): the dead member had sent each already
        late = [x for x in issuer.reversals[6:] if x["mti"] == "0400"]
        assert late == [], late
        print(f"claimed {claimed_s:.1f} s after the member died; member 2: {sw2()}")
    finally:
        for m in members:
            await m.stop()
        await issuer.stop()


async def test_requests_in_flight_on_a_dead_member_are_reversed_by_a_survivor(tmp_path, hub):
    issuer = Issuer(free_port(), drop=1.0)  # approves every 0200 and never answers it
    await issuer.start()
    members = []
    try:
        # The replies are still awaited at the death; the conductors were rebuilt by a reload
        # first, so the claim adopts into the version that took the journal and its mirror over.
        members = await _group(tmp_path, hub, issuer, "60s", reload_to="50s")
        one, two = members
        sw1 = lambda: one.rack.runtime.gears["switch"].metrics()  # noqa: E731
        sw2 = lambda: two.rack.runtime.gears["switch"].metrics()  # noqa: E731
        port = one.rack.runtime.gears["acquirer"].endpoint.port
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"".join(request("0200", s) for s in STANS))
        await wait_for(lambda: len(issuer.ledger) == 3, timeout=10, what="the issuer approving all three")
        assert sw1()["open_tickets"] == 3 and sw1()["unshared"] == 0, sw1()
        t_dead = await _kill(one)
        w.close()
        await wait_for(lambda: sw2().get("saf_answered") == 3, timeout=45, what="member 2 reversing the three")
        took = time.monotonic() - t_dead
        assert sw2()["mirror_tickets_claimed"] == 3 and sw2()["saf_owed"] == 3, sw2()
        for s in STANS:
            entry = issuer.ledger[(s, "TERM0001")]
            assert entry["reversals"] == ["0400"], entry  # reversed once, by the survivor
        # the survivor's reversals carry its own new STANs, the originals in DE 90
        assert sorted(x["original"][4:10] for x in issuer.reversals) == STANS
        print(f"in flight at the death, reversed {took:.1f} s later by member 2: {sw2()}")
    finally:
        for m in members:
            await m.stop()
        await issuer.stop()
