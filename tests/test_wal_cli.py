"""`fluxrig inspect-wal` (fluxrig.cli.cmd_wal): JSON lines on stdout, the recovery summary on
stderr, exit codes, and no change to the WAL it reads (also through the real CLI entry)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import cbor2

from fluxrig.cli.cmd_wal import inspect_wal, to_json
from fluxrig.wal import Wal
from fluxrig.wal.layout import segment_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_wal(d, n=5):
    with Wal(d, fsync="never") as w:
        for i in range(n):
            w.append({"i": i, "blob": b"\x00\x01", "tag": cbor2.CBORTag(40000, 7)})
        w.append(b"\xff\xfe not cbor")
        w.ack_many([1, 2])


def run(d, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = inspect_wal(str(d), out=out, err=err, **kw)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    summary = json.loads(err.getvalue()) if err.getvalue() else None
    return code, lines, summary


def test_dump_clean_wal(tmp_path):
    make_wal(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if f != "wal.lock"}
    code, lines, summary = run(tmp_path)
    assert code == 0
    assert [x["seq"] for x in lines] == [1, 2, 3, 4, 5, 6]
    first = lines[0]
    assert first["segment"] == segment_name(1) and first["offset"] == 40
    assert first["payload"] == {"i": 0, "blob": {"$b64": "AAE="}, "tag": {"$tag": 40000, "value": 7}}
    bad = lines[-1]
    assert bad["payload"] is None and "payload_error" in bad
    assert base64.b64decode(bad["payload_b64"]) == b"\xff\xfe not cbor"
    assert summary["cursor"] == 2 and summary["committed_seq"] == 6 and summary["unacked_records"] == 4
    assert summary["recovery"]["records_ok"] == 6 and summary["recovery"]["readonly"] is True
    after = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if f != "wal.lock"}
    assert after == before


def test_from_limit_raw(tmp_path):
    make_wal(tmp_path)
    _, lines, _ = run(tmp_path, start=3, limit=2, raw=True)
    assert [x["seq"] for x in lines] == [3, 4]
    assert "payload" not in lines[0] and cbor2.loads(base64.b64decode(lines[0]["payload_b64"]))["i"] == 2
    code, lines, summary = run(tmp_path, limit=0)
    assert lines == [] and summary["recovery"]["records_ok"] == 6


def test_damage_is_reported_not_repaired(tmp_path):
    make_wal(tmp_path)
    seg = tmp_path / segment_name(1)
    with open(seg, "ab") as fh:
        fh.write(b"\x00\x00\x00\x30torn")
    size = os.path.getsize(seg)
    code, lines, summary = run(tmp_path)
    assert code == 1
    assert summary["recovery"]["torn_bytes_truncated"] == 8
    assert len(lines) == 6
    assert os.path.getsize(seg) == size  # inspection never truncates


def test_not_a_wal(tmp_path):
    code, lines, summary = run(tmp_path / "missing")
    assert code == 2 and "error" in summary
    code, _, summary = run(tmp_path)  # exists, but holds no segment
    assert code == 2 and "no WAL segment" in summary["error"]


def test_to_json_odd_values():
    assert to_json({1: b"a", "x": [1.5, None]}) == {"1": {"$b64": "YQ=="}, "x": [1.5, None]}
    assert isinstance(to_json(object()), str)


def test_real_cli_entry(tmp_path):
    make_wal(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "inspect-wal", str(tmp_path), "--unacked", "--limit", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert [json.loads(x)["seq"] for x in p.stdout.splitlines()] == [3, 4]
    assert json.loads(p.stderr.strip().splitlines()[-1])["cursor"] == 2


def test_inspect_wal_lists_parked_records(tmp_path, capsys):
    import cbor2

    from fluxrig.cli.cmd_wal import list_parked_records
    from fluxrig.wal.parked import park

    d = tmp_path / "lanes"
    d.mkdir()
    park(str(d), "out-0000000000000007", b"\xff not cbor", "undecodable")
    park(str(d), "in-0000000000000002", cbor2.dumps(["a", 1]), "no-input")
    assert list_parked_records(str(d)) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["key"], x["reason"]) for x in lines] == [("in-0000000000000002", "no-input"),
                                                        ("out-0000000000000007", "undecodable")]  # fmt: skip
    assert lines[0]["payload"] == ["a", 1] and lines[1]["payload_b64"] == "/yBub3QgY2Jvcg=="
