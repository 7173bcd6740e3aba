"""duckdb_store.Spool + select_parts: the parts of one write share one tagged spool file per
kind (DuckDB's JSON reader pays per file), and every row still lands under its own part's
rack, id base and receive time, whatever the payload says."""

from __future__ import annotations

import json
import os

import duckdb
from fluxrig_mixer.duckdb_store import PART_TAG, Spool, select_parts
from fluxrig_mixer.telemetry_store import Clamp, Part

NOW = 1_800_000_000 * 10**9


def _part(rack: str, ids, base: int = 0, lead: str = "", extra: dict | None = None) -> Part:
    lines = "".join(lead + json.dumps({"id": i, "ts": NOW, "body": f"{rack} {i}", **(extra or {})}) + "\n" for i in ids)
    return Part("logs", rack, base, NOW + base, lines.encode(), len(ids))


def test_parts_share_one_file_and_keep_their_own_rack_base_and_receive_time(tmp_path):
    parts = [
        _part("r1", range(3)),
        _part("r2", range(2), base=1 << 40),
        _part("r3", range(2), lead="  "),  # a line not starting with "{": a file of its own
        _part("r4", range(2), extra={"_p": 0, "_fluxrig_part_0": 1, "rack": "r1"}),  # claims nothing
    ]
    spool = Spool(str(tmp_path))
    try:
        by_kind = spool.write(parts)
        files = by_kind["logs"]
        assert len({p for p, _part, _t in files}) == 2  # one shared file + r3's own
        assert [t is None for _p, _part, t in files] == [False, False, True, False]
        names, select = select_parts("logs", files, Clamp())
        rows = duckdb.connect().execute(f"SELECT rack, id, recv_ts FROM ({select}) ORDER BY rack, id").fetchall()
        spool.remove(by_kind)
        assert not [f for f in os.listdir(spool.dir)]
    finally:
        spool.close()
    assert rows == [
        ("r1", 0, NOW),
        ("r1", 1, NOW),
        ("r1", 2, NOW),
        ("r2", 1 << 40, NOW + (1 << 40)),
        ("r2", (1 << 40) + 1, NOW + (1 << 40)),
        ("r3", 0, NOW),
        ("r3", 1, NOW),
        ("r4", 0, NOW),
        ("r4", 1, NOW),
    ]
    assert PART_TAG.startswith("_fluxrig_part_") and len(PART_TAG) > len("_fluxrig_part_") + 8


def test_parts_past_own_file_bytes_get_a_file_of_their_own_and_read_back_the_same(tmp_path):
    """A large part skips the tagging rewrite (Spool.own_file_bytes); small ones still share the
    tagged file, a part with a line not starting with "{" still gets its own; every row reads
    back as with tagging only (the default, 0)."""
    parts = [
        _part("big", range(400)),
        _part("s1", range(3), base=1 << 40),
        _part("s2", range(2), lead=" "),
        _part("s3", range(2)),
    ]
    big = len(parts[0].data)
    results = []
    for own in (0, big):
        spool = Spool(str(tmp_path), own_file_bytes=own)
        try:
            by_kind = spool.write(parts)
            files = by_kind["logs"]
            tags = [t is None for _p, _part, t in files]
            _names, select = select_parts("logs", files, Clamp())
            rows = (
                duckdb.connect().execute(f"SELECT rack, id, recv_ts, body FROM ({select}) ORDER BY rack, id").fetchall()
            )
            spool.remove(by_kind)
        finally:
            spool.close()
        results.append((tags, len({p for p, _part, _t in files}), rows))
    assert results[0][:2] == ([False, False, True, False], 2)
    assert results[1][:2] == ([True, False, True, False], 3)  # big's own file, s2's own, s1+s3 shared
    assert results[0][2] == results[1][2] and len(results[1][2]) == 407
