"""`saf list|show|retry|park` through the Mixer API and CLI for a joined Rack (issue 16 item 4).

A real Mixer, a real Rack process (`fluxrig run`) running the switch scenario the Mixer gave
it, an independent issuer (pyiso8583, tests/test_saga.py) that approves and then goes away:
the switch owes reversals. Through the API the operator lists them (masked PAN), shows one with
its trail, retries one, parks one (durable on the Rack, audited on the Mixer); a read-only
token may read but not park; a park captured on the bus and sent again is refused as replayed;
the CLI (`fluxrig saf list --rack`) shows the same rows."""

from __future__ import annotations

import asyncio
import json
import os

import cbor2
import pytest
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import run_cli, snake_toml, start_rack_process, stop_rack_process, wait_for
from test_iso_switch import switch_text
from test_saga import Issuer, _approved_then_gone

from fluxrig.saga.store import read_parked
from fluxrig.wire.messages import SafAnswer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RACK = "saf-rack"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serving(port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


@pytest.mark.mixer
@pytest.mark.timeout(240)
async def test_saf_verbs_through_the_mixer_for_a_joined_rack(mixer, api, tmp_path):
    import httpx

    port, a, b = _free_port(), _free_port(), _free_port()
    saga_dir = tmp_path / "rack" / "saga" / "switch"
    conf = tmp_path / "fluxrig.toml"
    conf.write_text(
        f'[base]\nname = "{RACK}"\nstate_dir = "{tmp_path / "rack"}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "2s"\n[telemetry]\nbatch_interval = "500ms"\n'
        + snake_toml(mixer)
        + 'reconnect_wait = "200ms"\n'
    )
    issuer = Issuer(a, drop=1.0)
    await issuer.start()
    captured: list[bytes] = []

    async def record(msg):
        captured.append(msg.data)

    sub = await mixer.nc.subscribe(f"flux.ctrl.{RACK}.saf", cb=record)
    proc = await start_rack_process(str(conf))
    err = b""
    writer = None
    try:

        async def enrolled():
            return (await api.get(f"/api/v1/racks/{RACK}")).status_code == 200

        await wait_for(enrolled, timeout=30, what="the Rack enrolled")
        assert (await api.post(f"/api/v1/racks/{RACK}/approve", json={})).status_code == 200
        text = switch_text(port, a, b, ttl="200ms", saga_dir=str(saga_dir), backoff="100ms")
        r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=text)
        assert r.status_code == 200, r.text
        await wait_for(lambda: _serving(port), timeout=30, what="the switch listening on the Rack")
        await asyncio.sleep(0.5)  # the issuer link comes up
        writer = await _approved_then_gone(port, issuer, ["000077", "000078"])

        async def owed():
            r = await api.get(f"/api/v1/racks/{RACK}/saf", params={"state": "open"})
            return r.status_code == 200 and len(r.json()["rows"]) == 2 and r.json()

        listed = await wait_for(owed, timeout=20, what="2 owed reversals listed through the Mixer")
        rows = sorted(listed["rows"], key=lambda r: r["original"][4:10])
        assert [r["original"][4:10] for r in rows] == ["000077", "000078"]
        assert all(r["gear"] == "switch" and r["state"] == "waiting" and r["mti"] == "0400" for r in rows)
        first, second = rows[0]["id"], rows[1]["id"]

        # -- show: whole trail, PAN masked on the Rack ---------------------------------------------
        r = await api.get(f"/api/v1/racks/{RACK}/saf/{first}")
        assert r.status_code == 200, r.text
        shown = r.json()
        assert shown["trail"][0]["e"] == "owe" and shown["id"] == first
        assert "4111111111111111" not in r.text and shown["fields"]["2"].startswith("411111"), shown["fields"]
        assert (await api.get(f"/api/v1/racks/{RACK}/saf/{'0' * 32}")).status_code == 404

        # -- roles: a read-only token reads, may not park ------------------------------------------
        r = await api.post("/api/v1/auth/tokens", json={"name": "auditor", "role": "read"})
        assert r.status_code == 201, r.text
        async with httpx.AsyncClient(
            base_url=mixer.api_url, headers={"Authorization": f"Bearer {r.json()['token']}"}, timeout=15
        ) as reader:
            assert (await reader.get(f"/api/v1/racks/{RACK}/saf")).status_code == 200
            r = await reader.post(f"/api/v1/racks/{RACK}/saf/{first}/park", json={"reason": "not mine"})
            assert r.status_code == 403, r.text

        # -- retry (no leg up: due now, sent once the issuer is back) and park ---------------------
        r = await api.post(f"/api/v1/racks/{RACK}/saf/{second}/retry", json={})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        assert "due now" in r.json()["answer"]["detail"]
        n_before = len(captured)
        r = await api.post(f"/api/v1/racks/{RACK}/saf/{first}/park", json={"reason": "settled with issuer"})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        assert "parked (durable)" in r.json()["answer"]["detail"]
        parked = read_parked(str(saga_dir))  # on the Rack's disk when the answer came
        assert [p["id"] for p in parked] == [first] and parked[0]["trail"][-1]["why"] == "settled with issuer"
        r = await api.get(f"/api/v1/racks/{RACK}/saf", params={"state": "parked"})
        assert [row["id"] for row in r.json()["rows"]] == [first]
        r = await api.post(f"/api/v1/racks/{RACK}/saf/{first}/retry", json={})
        assert r.status_code == 409, r.text

        # -- the parked saga is one `reversal` trace span ------------------------------------------
        async def span():
            r = await api.get("/api/v1/telemetry/traces", params={"rack": RACK, "name": "reversal"})
            return r.status_code == 200 and r.json()

        spans = await wait_for(span, timeout=20, what="the reversal's trace span at the Mixer")
        attrs = json.loads(spans[0]["attributes"])
        assert spans[0]["status"] == "error" and spans[0]["trace_id"], spans[0]
        assert rows[0]["trace"] in ("", spans[0]["trace_id"])  # the request's trace, when it had one
        assert (attrs["saga"], attrs["outcome"], attrs["why"], attrs["gear"]) == (
            first, "parked", "settled with issuer", "switch")  # fmt: skip
        assert attrs["stan"] == rows[0]["stan"] and attrs["cause"] == rows[0]["cause"] and spans[0]["duration_ms"] > 0

        # -- a park captured on the bus and sent again: refused (nonce already spent) ---------------
        await wait_for(lambda: len(captured) > n_before, timeout=5, what="the park seen on the bus")
        park_bytes = [d for d in captured[n_before:] if cbor2.loads(cbor2.loads(d)["payload"])["args"]["op"] == "park"]
        assert len(park_bytes) == 1
        reply = await mixer.nc.request(f"flux.ctrl.{RACK}.saf", park_bytes[0], timeout=10)
        replayed = SafAnswer.decode(reply.data)
        assert not replayed.ok and "replayed" in replayed.detail, replayed

        # -- the CLI ----------------------------------------------------------------------------------
        code, out = await run_cli(mixer, "saf", "list", "--rack", RACK)
        assert code == 0, out
        assert [json.loads(line)["id"] for line in out.splitlines() if line.startswith("{")] == [second], out
        code, out = await run_cli(mixer, "saf", "show", second, "--rack", RACK)
        assert code == 0 and json.loads(out)["id"] == second and "4111111111111111" not in out, out
        code, out = await run_cli(mixer, "saf", "park", "nosuch", "--rack", RACK)
        assert code == 1 and "no reversal" in out, out

        # -- audited: every saf command is a rack event with its caller ------------------------------
        events = [e for e in (await api.get(f"/api/v1/racks/{RACK}")).json()["events"] if e["event"] == "ctrl.saf"]
        details = " ".join(e.get("detail") or "" for e in events)
        assert f"op=park saga={first}" in details and "by=" in details and f"op=retry saga={second}" in details
    finally:
        await sub.unsubscribe()
        if writer is not None:
            writer.close()
        err = await stop_rack_process(proc)
        await issuer.stop()
    assert proc.returncode == 0, err.decode()[-3000:]


def test_saf_answer_round_trips_and_is_bounded():
    from fluxrig.wire.messages import MAX_SAF_ROWS, WireError

    a = SafAnswer(True, "ab" * 16, "2 reversal(s)", [{"id": "x", "age_s": 1.5}], 2, {"trail": [{"e": "owe"}]})
    assert SafAnswer.decode(a.encode()) == a
    too_many = cbor2.dumps({"v": 1, "ok": True, "rows": [{}] * (MAX_SAF_ROWS + 1)})
    with pytest.raises(WireError, match="rows"):
        SafAnswer.decode(too_many)
    refused = SafAnswer.from_outcome({"ok": False, "nonce": "n", "detail": "refused (replayed): nonce ..."})
    assert not refused.ok and refused.detail.startswith("refused")
