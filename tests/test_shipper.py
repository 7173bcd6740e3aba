"""The telemetry shipper without a server: each record's NDJSON line is the wire format's own
(fluxrig.wire.telemetry), batches per kind with the Mixer's headers, the config keys, and the
shipper over a real telemetry WAL and the in-memory Snake of tests/fake_session.py."""

from __future__ import annotations

import asyncio
import time
from array import array

import pytest
from fake_session import FakeJetStream, FakeSession

from fluxrig.agent.publisher import Batch, DropReason
from fluxrig.agent.shipper import TELEMETRY_PACING, TelemetryCodec, TelemetryShipper, encode_line, pacing_from_config
from fluxrig.config import load_config
from fluxrig.errors import ConfigError
from fluxrig.wal import AsyncWal
from fluxrig.wire.telemetry import SRC_HEADER, decode_batch, encode_batch

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000_000_000_000
CORPUS = [
    ("logs", {"ts": NOW, "severity": "warning", "severity_text": "WARN", "body": "b", "attrs": {"a": 1}}),
    ("logs", {"ts": NOW, "severity": 17, "body": "ünïcode", "attrs": '{"json": "text"}'}),
    ("logs", {"ts": NOW, "body": "attrs not json", "attrs": "plain text", "trace_id": "ab" * 16}),
    ("logs", {"ts": NOW, "severity": None, "body": None}),
    ("metrics", {"ts": NOW, "name": "flux.wire.messages_sent", "type": "counter", "value": 3.5, "unit": "1"}),
    ("traces", {"trace_id": "t", "span_id": "s", "name": "reload", "span_kind": "internal", "start": 1, "end": 2}),
    ("traces", {"trace_id": "t", "span_id": "s2", "parent_span_id": "s", "status": "error", "attrs": {"x": [1]}}),
]


@pytest.mark.parametrize("kind, body", CORPUS)
def test_a_line_is_what_encode_batch_writes_for_the_record(kind, body):
    row = dict(body)
    if kind == "traces":  # the shipper's convention: the span's kind travels as span_kind
        row["kind"] = row.pop("span_kind", None)
    assert encode_line(kind, body, 42) == encode_batch(kind, "r", [{**row, "id": 42}])


def test_lines_join_into_a_batch_the_wire_format_reads():
    lines = [encode_line("logs", body, i) for i, (kind, body) in enumerate(CORPUS) if kind == "logs"]
    ids, rows = decode_batch(b"".join(lines), "logs")
    assert ids == [0, 1, 2, 3] and rows[1]["attrs"] == {"json": "text"} and rows[0]["severity"] == 13


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="unknown telemetry kind"):
        encode_line("spans", {}, 1)
    with pytest.raises(ValueError, match="2\\*\\*40"):
        encode_line("logs", {}, 1 << 40)
    codec = TelemetryCodec()
    assert codec.parse(1, b"\xff", "r") is DropReason.UNDECODABLE
    import cbor2

    assert codec.parse(1, cbor2.dumps({"kind": "nope"}), "r") is DropReason.UNDECODABLE
    assert codec.parse(1, cbor2.dumps([1, 2]), "r") is DropReason.UNDECODABLE


def test_a_batch_is_one_kind_with_the_mixers_headers():
    import cbor2

    codec = TelemetryCodec()
    entries = tuple(
        codec.parse(seq, cbor2.dumps({"kind": "logs", "ts": NOW, "body": str(seq)}), "edge") for seq in (7, 8)
    )
    assert entries[0].subject == "flux.telemetry.edge.logs"
    payload, headers = codec.encode(Batch(1, entries[0].subject, array("q", [7, 8]), 0, entries=entries), "edge", "w1")
    assert decode_batch(payload, "logs")[0] == [7, 8]
    assert headers == {"Nats-Msg-Id": "w1-edge.logs.7.2", SRC_HEADER: "w1"}


def test_config_keys_shape_the_pacing(tmp_path):
    assert pacing_from_config(load_config(None, environ={})) == TELEMETRY_PACING
    conf = tmp_path / "f.toml"
    conf.write_text('[telemetry]\nship_rate = 5000\nship_lag_budget = "20ms"\nship_max_inflight = 4\n')
    p = pacing_from_config(load_config(str(conf), environ={}))
    assert (p.rate, p.lag_budget, p.max_window, p.initial_window) == (5000.0, 0.02, 4, 2.0)
    for bad in ("ship_batch_records = 0", "ship_max_inflight = 0", "ship_rate = -1"):
        conf.write_text(f"[telemetry]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_config(str(conf), environ={})


async def until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_the_shipper_drains_its_wal_once_per_kind_in_order(tmp_path):
    js = FakeJetStream()
    js.add_stream("flux-telemetry", ["flux.telemetry.>"])
    session = FakeSession(js, "edge", ack_delay=0.002)
    wal = await AsyncWal.open(str(tmp_path / "wal"), fsync="never")
    shipper = TelemetryShipper.from_config(wal, session, load_config(None, environ={}))
    try:
        for i in range(3000):
            kind = "metrics" if i % 10 == 0 else "logs"
            wal.append_nowait({"kind": kind, "ts": NOW + i, "name": "m", "value": 1.0, "body": f"r{i}"})
        wal.append_nowait(b"\xff not cbor")
        await wal.flush()
        session.fail_next(2)
        await shipper.start()
        await until(lambda: wal.cursor == wal.committed_seq, what="the WAL drained")
        got: dict[str, list[int]] = {}
        for m in js.stored("flux-telemetry"):
            kind = m.subject.rsplit(".", 1)[1]
            got.setdefault(kind, []).extend(decode_batch(m.data, kind)[0])
        assert got["logs"] == [s for s in range(1, 3001) if (s - 1) % 10] and len(got["metrics"]) == 300
        st = shipper.stats
        assert st["shipped"] == 3000 and st["undecodable"] == 1 and st["backlog"] == 0
        assert st["publish_failures"] >= 1 and st["records_per_batch"] > 50, st
    finally:
        await shipper.stop()
        await wal.close()
