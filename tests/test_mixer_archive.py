"""ClickHouse as the Mixer's telemetry archive, end to end, against a real clickhouse-server
(Debian's package, one per session) and a real nats-server.

- Rack agent -> Snake -> Mixer (telemetry.backend = "clickhouse") -> ClickHouse, rows
  queryable through the API, with cursor pagination and a Parquet export.
- SIGKILL of an ingest process between its insert and its JetStream ack, 20 times under load:
  every record is present exactly once (ReplacingMergeTree + FINAL; see clickhouse_store.py).
- Start-up refuses, with a message and exit 2, an unreachable server and a schema newer than
  this Mixer knows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import httpx
import pytest
from clickhouse_server import USER, fresh_database
from fluxrig_mixer.cli import main as mixer_main
from fluxrig_mixer.ingest import CONSUMER, TelemetryIngest
from helpers import ROOT
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import make_mixer, publish_telemetry, snake_streams, wait_for

from fluxrig.agent.session import SessionUnavailable
from fluxrig.wire import subjects as S
from fluxrig.wire.telemetry import SRC_HEADER, encode_batch

# `make test` kills 5 times; the 20 run in `make test-archive` (marker `soak`).
KILLS_QUICK = 5
KILLS = int(os.environ.get("FLUXRIG_ARCHIVE_KILLS", "20"))
CHILD = os.path.join(os.path.dirname(__file__), "archive_ingest_child.py")


def ch_overrides(server, database: str) -> dict:
    return {
        "telemetry.backend": "clickhouse",
        "clickhouse.port": server.port,
        "clickhouse.user": USER,
        "clickhouse.password_file": server.password_file,
        "clickhouse.database": database,
        "clickhouse.flush_interval": 0.1,
    }


@pytest.fixture
async def mixer(tmp_path, clickhouse):
    """This module's Mixer stores telemetry in ClickHouse (agent_factory dials it)."""
    database = fresh_database("e2e")
    m = await make_mixer(tmp_path / "mixer", **ch_overrides(clickhouse, database), **{"enrollment.auto_adopt": True})
    try:
        yield m
    finally:
        await m.stop()
        c = clickhouse.client()
        c.execute(f"DROP DATABASE IF EXISTS {database}")
        c.disconnect()


async def test_rack_to_clickhouse_through_the_api(mixer, agent_factory, tmp_path):
    async with httpx.AsyncClient(
        base_url=mixer.api_url, headers={"Authorization": f"Bearer {mixer.api_token}"}, timeout=10
    ) as api:
        agent = await agent_factory("edge-ch")
        await wait_for(lambda: agent.status == "active", what="auto-adopted")
        now = time.time_ns()
        records = [
            {"id": i, "ts": now + i, "severity": "warn" if i % 2 else "info", "body": f"line {i} a_b"}
            for i in range(250)
        ]
        batch = encode_batch("logs", "edge-ch", records)

        async def published():  # the agent re-dials with its own identity once active
            try:
                return await publish_telemetry(agent, "logs", batch, msg_id="edge-ch.logs.0.250")
            except SessionUnavailable:
                return None

        await wait_for(published, timeout=20, what="the Rack's session up to publish")
        await publish_telemetry(agent, "logs", batch, msg_id="edge-ch.logs.0.250.again")  # a re-send

        async def stored():
            return len((await api.get("/api/v1/telemetry/logs", params={"limit": 1000})).json()) == 250

        await wait_for(stored, timeout=20, what="logs in ClickHouse")
        assert mixer.ingest.stats["backend"] == "clickhouse"
        seen, cursor = [], None
        while True:
            params = {"rack": "edge-ch", "limit": 100} | ({"cursor": cursor} if cursor else {})
            r = await api.get("/api/v1/telemetry/logs", params=params)
            assert r.status_code == 200, r.text
            seen += [row["id"] for row in r.json()]
            cursor = r.headers.get("x-next-cursor")
            if not cursor:
                break
            assert 'rel="next"' in r.headers["link"]
        assert sorted(seen) == list(range(250))
        warn = (await api.get("/api/v1/telemetry/logs", params={"min_level": "warn", "q": "A_B", "limit": 1000})).json()
        assert len(warn) == 125
        big = await api.get("/api/v1/telemetry/logs", params={"since": "99999999999d"})
        assert big.status_code == 200
        exp = await api.get("/api/v1/telemetry/export", params={"kind": "logs", "since": "1h"})
        assert exp.status_code == 200 and exp.headers["x-rows"] == "250"
        path = tmp_path / "logs.parquet"
        path.write_bytes(exp.content)
        assert duckdb.connect().execute(f"SELECT count(DISTINCT id) FROM read_parquet('{path}')").fetchone()[0] == 250
        prom = (await api.get("/metrics")).text
        assert "fluxrig_mixer_telemetry_store_up 1" in prom


@pytest.fixture
async def bus(tmp_path):
    async with snake_streams(tmp_path) as pair:
        yield pair


@pytest.mark.timeout(200)
async def test_sigkill_between_insert_and_ack_under_load(bus, clickhouse, tmp_path, capsys):
    await _kill_between_insert_and_ack(bus, clickhouse, tmp_path, capsys, KILLS_QUICK)


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_sigkill_between_insert_and_ack_twenty_times_under_load(bus, clickhouse, tmp_path, capsys):
    await _kill_between_insert_and_ack(bus, clickhouse, tmp_path, capsys, KILLS)


async def _kill_between_insert_and_ack(bus, clickhouse, tmp_path, capsys, times: int) -> None:
    snake, js = bus
    database = fresh_database("kill")
    cfg = {
        "port": clickhouse.port,
        "user": USER,
        "password": clickhouse.password,
        "database": database,
        "spool": str(tmp_path),
        "url": snake.url,
        # The Mixer's own NKey seed (memory only; stdin, never argv) and the Snake's CA.
        "bus_seed": snake.client_options()["nkeys_seed_str"],
        "bus_ca": snake.tls["ca_file"],
        "hold_after_insert": 2.0,
    }
    sent = {"r1": 0, "r2": 0}
    stop_load = asyncio.Event()

    async def load():
        while not stop_load.is_set():
            for rack in sent:
                first = sent[rack]
                lines = "".join(
                    json.dumps({"id": first + i, "ts": time.time_ns(), "body": f"{rack} {first + i}"}) + "\n"
                    for i in range(100)
                )
                await js.publish(S.telemetry(rack, "logs"), lines.encode(), headers={SRC_HEADER: "wal-0"})
                sent[rack] += 100
            await asyncio.sleep(0.05)

    loader = asyncio.create_task(load())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]))
    kills = 0
    started = time.monotonic()
    try:
        for _ in range(times):
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                CHILD,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            child.stdin.write((json.dumps(cfg) + "\n").encode())
            await child.stdin.drain()
            try:
                while True:
                    line = await asyncio.wait_for(child.stdout.readline(), 30)
                    assert line, "the ingest child exited before inserting"
                    if line.startswith(b"inserted"):
                        break
            finally:
                child.send_signal(signal.SIGKILL)  # after the insert, before the ack
                await child.wait()
            kills += 1
    finally:
        stop_load.set()
        await loader
    kill_s = time.monotonic() - started
    expected = {(r, i) for r, n in sent.items() for i in range(n)}
    from fluxrig_mixer.clickhouse_store import ClickHouseSettings, ClickHouseStore

    store = ClickHouseStore(
        ClickHouseSettings(port=clickhouse.port, user=USER, password=clickhouse.password, database=database),
        spool_dir=str(tmp_path),
    )
    ingest = TelemetryIngest(store, flush_interval=0.1)
    await ingest.start(js)
    try:

        async def drained():
            i = await js.consumer_info(S.STREAM_TELEMETRY, CONSUMER)
            return i.num_pending == 0 and i.num_ack_pending == 0

        # What the killed children left: every record since the first kill's fetch. A loaded
        # 2-core box drains it at ~10-30k rows/s, so the bound grows with it (10k rows/s floor).
        budget = 60 + len(expected) / 10_000
        deadline = time.monotonic() + budget
        while not await drained():
            assert time.monotonic() < deadline, (
                f"the last ingest did not drain {len(expected)} records in {budget:.0f}s"
            )
            await asyncio.sleep(0.1)
    finally:
        await ingest.stop()
    c = clickhouse.client()
    try:
        raw = c.execute(f"SELECT count() FROM {database}.telemetry_logs")[0][0]
        final, distinct = c.execute(f"SELECT count(), uniqExact(rack, id) FROM {database}.telemetry_logs FINAL")[0]
        ids = set(c.execute(f"SELECT rack, id FROM {database}.telemetry_logs FINAL"))
        c.execute(f"DROP DATABASE IF EXISTS {database}")
    finally:
        c.disconnect()
    assert kills == times
    assert ids == expected, f"{len(expected - ids)} missing, {len(ids - expected)} unexpected"
    assert final == distinct == len(expected)
    with capsys.disabled():
        print(
            f"\n[archive SIGKILL x{kills} in {kill_s:.1f}s] {len(expected)} records once each; "
            f"{raw - final} replayed rows collapsed"
        )


def _write_config(tmp_path, **clickhouse) -> str:
    lines = ["[base]", f'state_dir = "{tmp_path / "state"}"', "[api]", 'host = "127.0.0.1"', "port = 0"]
    lines += ["[snake]", 'host = "127.0.0.1"', "port = 0", "[telemetry]", 'backend = "clickhouse"', "[clickhouse]"]
    for k, v in clickhouse.items():
        lines.append(f"{k} = {json.dumps(v)}")
    path = tmp_path / "fluxrig-mixer.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _serve(path: str, capsys) -> tuple[int, str]:
    code = mixer_main(["serve", "-c", path])
    return code, capsys.readouterr().err


def test_start_refuses_an_unreachable_server_with_exit_2(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    code, err = _serve(_write_config(tmp_path, port=port, connect_timeout="1s"), capsys)
    assert code == 2, err
    assert "unreachable" in err and "clickhouse" in err.lower()
    assert not os.path.exists(tmp_path / "state" / "snake" / "nats-server.pid")


def test_start_refuses_a_newer_schema_with_exit_2(tmp_path, clickhouse, capsys):
    database = fresh_database("schema")
    c = clickhouse.client()
    c.execute(f"CREATE DATABASE {database}")
    c.execute(
        f"CREATE TABLE {database}.telemetry_schema (version UInt32, applied_at DateTime DEFAULT now()) ENGINE = TinyLog"
    )
    c.execute(f"INSERT INTO {database}.telemetry_schema (version) VALUES", [(99,)])
    try:
        code, err = _serve(
            _write_config(
                tmp_path, port=clickhouse.port, user=USER, password_file=clickhouse.password_file, database=database
            ),
            capsys,
        )
        assert code == 2, err
        assert "v99" in err and "newer" in err and "clickhouse.database" in err
    finally:
        c.execute(f"DROP DATABASE IF EXISTS {database}")
        c.disconnect()


def test_a_password_file_others_can_read_is_refused(tmp_path, clickhouse, capsys):
    loose = tmp_path / "pw"
    loose.write_text(clickhouse.password)
    os.chmod(loose, 0o644)
    code, err = _serve(_write_config(tmp_path, port=clickhouse.port, user=USER, password_file=str(loose)), capsys)
    assert code == 2 and "chmod 600" in err
    assert clickhouse.password not in err


def test_plain_text_to_a_remote_host_needs_an_explicit_opt_in(tmp_path, capsys):
    code, err = _serve(_write_config(tmp_path, url="clickhouse://archive.example:9000/fluxrig"), capsys)
    assert code == 2 and "insecure_plaintext" in err


def test_retention_drops_whole_days_older_than_the_ttl(clickhouse, tmp_path):
    from fluxrig_mixer.clickhouse_store import ClickHouseSettings, ClickHouseStore
    from fluxrig_mixer.telemetry_store import Clamp, Part

    database = fresh_database("ttl")
    store = ClickHouseStore(
        ClickHouseSettings(
            port=clickhouse.port, user=USER, password=clickhouse.password, database=database, ttl=2 * 86400.0
        ),
        clamp=Clamp(max_age_ns=30 * 86400 * 10**9),
        spool_dir=str(tmp_path),
    )
    try:
        now = time.time_ns()
        day = 86400 * 10**9
        lines = "".join(json.dumps({"id": i, "ts": now - i * day, "body": f"{i} days ago"}) + "\n" for i in range(6))
        store.write([Part("logs", "r1", 0, now, lines.encode(), 6)], [])
        dropped = store.apply_retention(0)  # the TTL decides, not the ingest's cutoff
        left = sorted(r["id"] for r in store.queries.logs(since="99999999999d"))
        assert dropped >= 3 and left[:2] == [0, 1] and max(left) <= 2  # day 2 may straddle the cut's day
    finally:
        store._client().execute(f"DROP DATABASE IF EXISTS {database}")
        store.close()
