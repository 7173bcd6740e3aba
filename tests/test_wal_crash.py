"""A Rack-like child process SIGKILLed 50 times while appending to its WAL, restarted each time.

The child runs AsyncWal with 8 concurrent appenders (policies `always` and `batch`
alternating) and writes `seq run writer i` to a side file only after the append's future has
resolved, i.e. after the record was acknowledged durable. It also plays shipper: at start it
acknowledges old records so the cursor moves and fully acknowledged segments get deleted while
the kills keep coming. After the 50th kill the parent opens the WAL like a restarted Rack:
recovery must be automatic, find no corruption, and every acknowledged record above the cursor
must be there with exactly the payload written under its seq. Bounded to about 20 s.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import cbor2

from fluxrig.wal import Wal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 50
BUDGET_S = 60  # 50 kills take well under 20 s on a quiet box; a loaded CI box needs the slack

CHILD = r"""
import asyncio, json, os, sys
import cbor2
from fluxrig.wal import AsyncWal

d, side, policy, run = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

async def main():
    wal = await AsyncWal.open(d, fsync=policy, batch_window_ms=5, cursor_sync_ms=5,
                              segment_max_bytes=64 * 1024, max_size_bytes=None)
    fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # shipper: acknowledge the older records so the cursor moves and segments go away
    old = await wal.read_from(wal.cursor + 1, 100000, 1 << 30)
    wal.ack_many(r.seq for r in old if r.seq < wal.committed_seq - 1000)
    print(json.dumps(wal.recovery.as_dict()), flush=True)

    async def writer(k):
        i = 0
        while True:
            i += 1
            seq = await wal.append(cbor2.dumps({"run": run, "w": k, "i": i, "pad": b"x" * 64}))
            os.write(fd, f"{seq} {run} {k} {i}\n".encode())  # only after it is durable

    await asyncio.gather(*(writer(k) for k in range(8)))

asyncio.run(main())
"""


def test_sigkill_during_appends_loses_nothing_acknowledged(tmp_path):
    wal_dir = tmp_path / "wal"
    side = tmp_path / "acked.txt"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rnd = random.Random(50)
    t_end = time.monotonic() + BUDGET_S
    summaries = []
    kills = 0
    for run in range(KILLS):
        if time.monotonic() > t_end:
            break
        policy = ("always", "batch")[run % 2]
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(wal_dir), str(side), policy, str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode()
            summaries.append(json.loads(line))
            time.sleep(rnd.uniform(0.01, 0.08))
            proc.send_signal(signal.SIGKILL)
            kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            proc.stdout.close()
            proc.stderr.close()
    assert kills >= 40, f"only {kills} kills fitted in {BUDGET_S} s"

    acked = {}
    for raw in side.read_bytes().split(b"\n"):
        parts = raw.split()
        if len(parts) == 4:  # a line cut by the kill is not an acknowledgement
            seq, run, k, i = map(int, parts)
            assert seq not in acked, "one seq acknowledged twice"
            acked[seq] = (run, k, i)
    assert len(acked) > 1000

    with Wal(wal_dir, segment_max_bytes=64 * 1024, max_size_bytes=None) as w:
        r = w.recovery
        assert r.corrupt_records_skipped == 0 and r.headers_damaged == 0
        present = {x.seq: cbor2.loads(x.payload) for x in w.read_from(0, 10**7, 1 << 31)}
        cursor = w.cursor
    for s in summaries:  # every restart recovered on its own, without corruption
        assert s["corrupt_records_skipped"] == 0
    assert cursor > 0  # the shipper's acks moved it, segments were deleted under the kills
    checked = 0
    for seq, (run, k, i) in acked.items():
        if seq <= cursor:
            continue  # acknowledged upstream too: its segment may be gone
        body = present.get(seq)
        assert body is not None, f"acknowledged record {seq} (run {run}) lost"
        assert (body["run"], body["w"], body["i"]) == (run, k, i)
        checked += 1
    print(f"kills={kills} acked={len(acked)} checked={checked} cursor={cursor} records={len(present)}")
    assert checked >= 500
    # and no seq was ever reused for a different record: per (run, writer), i strictly grows
    last = {}
    for seq in sorted(present):
        key = (present[seq]["run"], present[seq]["w"])
        assert present[seq]["i"] > last.get(key, 0)
        last[key] = present[seq]["i"]
