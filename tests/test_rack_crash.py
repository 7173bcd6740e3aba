"""A real `fluxrig run` process SIGKILLed 50 times while it writes its telemetry WAL: every
record that was on disk before a kill is still there, unchanged, after the next restart and
recovery, which needs no human."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KILLS = 50


def _wal_records(wal_dir: str) -> tuple[dict[int, str], dict]:
    r = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "inspect-wal", wal_dir],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode in (0, 1), r.stderr  # 1 = damage found and skipped (a torn tail after a kill)
    records = {}
    for line in r.stdout.splitlines():
        doc = json.loads(line)
        records[doc["seq"]] = json.dumps(doc["payload"], sort_keys=True)
    summary = json.loads(r.stderr.strip().splitlines()[-1]) if r.stderr.strip() else {}
    return records, summary


def _has_records(wal_dir) -> bool:
    try:
        return any(p.stat().st_size > 64 for p in wal_dir.glob("*.seg"))
    except OSError:
        return False


def test_rack_process_killed_50_times_keeps_every_durable_record(tmp_path):
    state = tmp_path / "state"
    conf = tmp_path / "fluxrig.toml"
    # Joined to a Snake that is never there: the Rack runs, writes logs and metrics to its WAL
    # every 50 ms, and nothing ever ships them, so the WAL only grows.
    conf.write_text(
        f'[base]\nname = "crashy"\nstate_dir = "{state}"\n'
        '[store]\nwal_fsync = "always"\n'
        '[telemetry]\nbatch_interval = "50ms"\n'
        '[snake]\nurl = "nats://127.0.0.1:1"\nbootstrap_token = "unused"\nreconnect_wait = "100ms"\n'
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    rng = random.Random(8583)
    seen: dict[int, str] = {}
    for i in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluxrig.cli.main", "run", "-c", str(conf)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Killed at a random point once it writes (a loaded machine may take seconds to start).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not _has_records(state / "wal"):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if not seen and not (state / "wal").exists():
            continue  # killed before its first start-up got as far as the WAL (a busy machine): nothing to keep yet
        records, summary = _wal_records(str(state / "wal"))
        lost = [seq for seq in seen if seq not in records]
        changed = [seq for seq in seen if seq in records and records[seq] != seen[seq]]
        assert not lost and not changed, f"kill {i + 1}: lost {lost[:5]}, changed {changed[:5]}; {summary}"
        assert len(records) >= len(seen)
        seen = records
    assert len(seen) > KILLS * 5, f"only {len(seen)} records written across {KILLS} runs"
    print(f"{KILLS} SIGKILLs, {len(seen)} records, none lost or altered")
