"""Sans-IO parts of the control plane: wire payloads, telemetry batches, subjects, the status
table, the generated nats-server config, projections, passports' edge cases."""

from __future__ import annotations

import pytest
from fluxrig_mixer.scenarios import project
from fluxrig_mixer.snake import BusUser, rack_permissions, render_config
from fluxrig_mixer.states import EVENTS, TRANSITIONS, IllegalTransition, next_status
from hypothesis import given
from hypothesis import strategies as st

from fluxrig.errors import PassportExpired, PassportMalformed
from fluxrig.passport import ClusterKey, Passport, decode_unverified, masked_payload, sign_passport, verify_passport
from fluxrig.wire import subjects as S
from fluxrig.wire.telemetry import MAX_RECORD_ID, TelemetryFormatError, decode_batch, encode_batch, severity_number


@given(st.lists(st.tuples(st.integers(0, MAX_RECORD_ID - 1), st.text(max_size=20), st.integers(1, 24)), max_size=50))
def test_telemetry_batch_roundtrip(rows):
    recs = [{"id": i, "ts": 1, "body": b, "severity": s, "attrs": {"k": b}} for i, b, s in rows]
    data = encode_batch("logs", "r1", recs, src="w1")
    assert data.count(b"\n") == len(rows)
    ids, out = decode_batch(data, "logs")
    assert ids == [r[0] for r in rows]
    assert [o["body"] for o in out] == [r[1] for r in rows] and all(o["trace_id"] is None for o in out)
    assert [o["attrs"] for o in out] == [{"k": r[1]} for r in rows]


def test_telemetry_batch_rejects():
    with pytest.raises(ValueError):
        encode_batch("spans", "r1", [])
    with pytest.raises(ValueError):
        encode_batch("logs", "r1", [{"id": MAX_RECORD_ID}])
    for data, key in ((b'{"id": -1}\n', "id"), (b'{"ts": 1}\n', "id"), (b"[1]\n", None), (b"{oops\n", None)):
        with pytest.raises(TelemetryFormatError) as e:
            decode_batch(data, "logs")
        assert e.value.key == key
    assert severity_number("WARN") == 13 and severity_number("nonsense") == 9 and severity_number(99) == 24
    # attrs given as JSON text travel as an object; non-JSON text is wrapped.
    _ids, rows = decode_batch(
        encode_batch("metrics", "r", [{"id": 1, "attrs": '{"a":1}'}, {"id": 2, "attrs": "x"}]), "metrics"
    )
    assert rows[0]["attrs"] == {"a": 1} and rows[1]["attrs"] == {"text": "x"}


def test_subjects():
    assert S.heartbeat("edge-1") == "fluxrig.agent.heartbeat.edge-1"
    assert S.telemetry("edge-1", "logs") == "flux.telemetry.edge-1.logs"
    assert S.rack_of_subject("flux.telemetry.edge-1.metrics") == "edge-1"
    assert S.rack_of_subject("fluxrig.agent.heartbeat.x") == "x"
    assert S.sanitize_rack_name(" My Host.example.com ") == "my-host-example-com"
    assert S.sanitize_rack_name("***") == "rack"
    for bad in ("a.b", "A", "*", ">", "", "x" * 64):
        with pytest.raises(ValueError):
            S.heartbeat(bad)


def test_state_table():
    assert next_status("r", "pending", "approve") == "active"
    with pytest.raises(IllegalTransition) as e:
        next_status("r", "removed", "activate")
    assert e.value.allowed == []
    # Every status but removed can be removed; nothing leaves removed.
    assert {f for (f, ev) in TRANSITIONS if ev == "remove"} == {"pending", "active", "offline", "suspended"}
    assert not [k for k in TRANSITIONS if k[0] == "removed"]
    # A rename keeps the status, from every status but removed (issue 13).
    assert {f: t for (f, ev), t in TRANSITIONS.items() if ev == "rename"} == {
        s: s for s in ("pending", "active", "offline", "suspended")
    }
    assert "rename" in EVENTS and {ev for (_f, ev) in TRANSITIONS} <= set(EVENTS)
    with pytest.raises(IllegalTransition) as e:
        next_status("r", "removed", "rename")
    assert "cannot rename" in str(e.value)


def test_rack_permissions_and_config():
    pub, sub = rack_permissions("edge-1", full=True)
    assert "flux.telemetry.edge-1.>" in pub and "flux.msg.edge-1.>" in pub
    assert all("edge-1" in p or p == S.HELLO for p in pub)
    assert sub == ("flux.ctrl.edge-1.>", "_INBOX_edge-1.>")
    pub2, _ = rack_permissions("edge-1", full=False)
    assert pub2 == (S.HELLO, "fluxrig.agent.heartbeat.edge-1")
    text = render_config(
        host="127.0.0.1",
        port=4222,
        store_dir="/d/js",
        users=[BusUser("UABC", pub, sub)],
        no_auth_user="UENROLL",
        tls={"cert_file": "/c.pem", "key_file": "/k.pem", "ca_file": "/ca.pem", "verify": True},
    )
    assert "sync_interval: always" in text and "verify: true" in text and '"nkey": "UABC"' in text
    assert 'no_auth_user: "UENROLL"' in text and "password" not in text


def test_projection():
    doc = {
        "meta": {"name": "x", "version": "1"},
        "racks": [{"name": "a"}, {"name": "b"}, {"group": "edge", "match": {"labels": {"site": "lab"}}}],
        "gears": [
            {"name": "g1", "type": "t", "deploy": "a"},
            {"name": "g2", "type": "t", "deploy": "b"},
            {"name": "g3", "type": "t"},
            {"name": "g4", "type": "t", "deploy": "edge"},
        ],
        "wires": [
            {"from": "g1.out", "to": "g3.in"},
            {"from": "g1.out", "to": "g2.in"},
            {"from": "g4.out", "to": "g3.in"},
        ],
    }
    pa = project(doc, "a")
    assert [g["name"] for g in pa["gears"]] == ["g1", "g3"]
    assert pa["wires"] == [{"from": "g1.out", "to": "g3.in"}]
    assert pa["x-remote-wires"][0]["subject"] == "flux.msg.a.g1.out" and pa["racks"] == [{"name": "a"}]
    pb = project(doc, "b", {"site": "lab"})
    assert [g["name"] for g in pb["gears"]] == ["g2", "g3", "g4"]
    assert {"from": "g4.out", "to": "g3.in"} in pb["wires"]
    assert pb["x-remote-wires"][0]["direction"] == "in"


def test_passport_expiry_and_masking():
    key = ClusterKey.generate()
    data = sign_passport(
        key, Passport("r1", "r1", "active", "u", "hunter2", issued_at=100.0, expires_at=200.0, serial=1)
    )
    assert verify_passport(data, [key.public_key], now=150.0).bus_password == "hunter2"
    with pytest.raises(PassportExpired):
        verify_passport(data, [key.public_key], now=250.0)
    with pytest.raises(PassportMalformed):  # issued far in the future
        verify_passport(data, [key.public_key], now=-1000.0)
    shown = masked_payload(decode_unverified(data))
    assert shown["bus"]["password"] == "********" and "hunter2" not in repr(shown)


def test_cluster_key_file(tmp_path):
    import os
    import stat

    path = str(tmp_path / "cluster.key")
    k1 = ClusterKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ClusterKey.load_or_create(path).public_key == k1.public_key
    assert open(path + ".pub").read().strip() == k1.public_hex
