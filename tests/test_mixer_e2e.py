"""End to end with a real nats-server child and a real DuckDB file: enroll -> approve ->
activate -> telemetry queryable through the API; wrong token denied; API without a token."""

from __future__ import annotations

import os
import time

import httpx
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import publish_telemetry, wait_for

from fluxrig.wire.telemetry import encode_batch

SCENARIO = """
meta: {name: e2e, version: "1"}
gears:
  - name: gen
    type: generator
    config: {interval: 1s}
  - name: sink
    type: sink
wires:
  - {from: gen.out, to: sink.in}
"""


async def test_enroll_approve_activate_telemetry(mixer, api, agent_factory):
    agent = await agent_factory("edge-1")
    await wait_for(lambda: agent.passport is not None, what="enrollment")
    assert agent.status == "pending"
    racks = (await api.get("/api/v1/racks")).json()
    assert [r["name"] for r in racks] == ["edge-1"] and racks[0]["status"] == "pending"
    assert "bus_password" not in racks[0]

    r = await api.post("/api/v1/racks/edge-1/approve", json={})
    assert r.status_code == 200, r.text
    await wait_for(lambda: agent.status == "active", what="approval reaching the rack")

    r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=SCENARIO)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    await wait_for(lambda: agent.applied_version == version and agent.apply_state == "applied", what="apply")
    doc, v = agent.applied.calls[-1]
    assert v == version and [g["name"] for g in doc["gears"]] == ["gen", "sink"]

    async def reported():
        rack = (await api.get("/api/v1/racks/edge-1")).json()
        return rack["scenario"]["apply_state"] == "applied" and rack["scenario"]["version"] == version

    await wait_for(reported, what="apply report at the Mixer")

    now = time.time_ns()
    batch = encode_batch(
        "logs",
        "edge-1",
        [
            {
                "id": i,
                "ts": now + i,
                "severity": "warn" if i % 2 else "info",
                "severity_text": "WARN" if i % 2 else "INFO",
                "body": f"line {i}",
                "attrs": {"gear": "gen"},
            }
            for i in range(10)
        ],
    )
    ack = await publish_telemetry(agent, "logs", batch, msg_id="edge-1.logs.0.10")
    assert ack.stream == "flux-telemetry"
    # The same records re-sent under another msg id land once (DuckDB primary key).
    await publish_telemetry(agent, "logs", batch, msg_id="edge-1.logs.0.10.again")
    metrics = encode_batch(
        "metrics",
        "edge-1",
        [
            {"id": i, "ts": now + i, "name": "flux.gear.messages_in", "type": "counter", "value": float(i)}
            for i in range(5)
        ],
    )
    await publish_telemetry(agent, "metrics", metrics)

    async def logs_there():
        rows = (await api.get("/api/v1/telemetry/logs", params={"rack": "edge-1", "limit": 100})).json()
        return len(rows) == 10 and rows

    rows = await wait_for(logs_there, what="logs in DuckDB")
    assert rows[0]["body"] == "line 9"
    warn = (await api.get("/api/v1/telemetry/logs", params={"min_level": "warn"})).json()
    assert len(warn) == 5 and all(r["severity"] >= 13 for r in warn)
    assert len((await api.get("/api/v1/telemetry/logs", params={"q": "LINE 3"})).json()) == 1
    await wait_for(lambda: mixer.ingest.stats["rows"].get("metrics") == 5, what="metrics")
    b = (await api.get("/api/v1/telemetry/metrics", params={"name": "flux.gear.*", "bucket": "1h"})).json()
    assert b[0]["count"] == 5 and b[0]["sum"] == 10.0
    assert mixer.ingest.stats["duplicates"]["logs"] == 10

    topo = (await api.get("/api/v1/topology")).json()
    assert topo["racks"][0]["gears"] == ["gen", "sink"]
    prom = (await api.get("/metrics")).text
    assert 'fluxrig_mixer_racks{status="active"} 1' in prom


async def test_wrong_token_denied_nothing_registered(mixer, api, agent_factory):
    agent = await agent_factory("intruder", token="not-the-token")
    await wait_for(lambda: agent.denials >= 1, what="denial")
    assert agent.passport is None
    assert (await api.get("/api/v1/racks", params={"include_removed": "true"})).json() == []
    assert mixer.controller.counters["hello_denied"] >= 1


async def test_api_requires_token(mixer):
    async with httpx.AsyncClient(base_url=mixer.api_url) as client:
        assert (await client.get("/api/v1/health")).status_code == 200
        for path in (
            "/api/v1/racks",
            "/api/v1/scenarios",
            "/api/v1/telemetry/logs",
            "/metrics",
            "/docs",
            "/openapi.json",
        ):
            assert (await client.get(path)).status_code == 401, path
        r = await client.get("/api/v1/racks", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await client.get("/openapi.json", headers={"Authorization": f"Bearer {mixer.api_token}"})
        assert r.status_code == 200 and "/api/v1/racks/{rack}/approve" in r.json()["paths"]


async def test_retention_and_traces(mixer, api, agent_factory):
    agent = await agent_factory("ret-1")
    await wait_for(lambda: agent.passport is not None, what="enrolled")
    assert (await api.post("/api/v1/racks/ret-1/approve", json={})).status_code == 200
    await wait_for(lambda: agent.status == "active" and agent.connected.is_set(), what="active")
    now = time.time_ns()
    old = now - 30 * 86400 * 10**9
    await publish_telemetry(
        agent,
        "logs",
        encode_batch("logs", "ret-1", [{"id": 1, "ts": old, "body": "ancient"}, {"id": 2, "ts": now, "body": "fresh"}]),
    )
    await publish_telemetry(
        agent,
        "traces",
        encode_batch(
            "traces",
            "ret-1",
            [
                {
                    "id": 1,
                    "trace_id": "t1",
                    "span_id": "s1",
                    "name": "authorize",
                    "start": now,
                    "end": now + 2_500_000,
                    "status": "ok",
                }
            ],
        ),
    )
    await wait_for(
        lambda: mixer.ingest.stats["rows"].get("logs") == 2 and mixer.ingest.stats["rows"].get("traces") == 1,
        what="ingested",
    )
    spans = (await api.get("/api/v1/telemetry/traces", params={"trace_id": "t1"})).json()
    assert spans[0]["name"] == "authorize" and abs(spans[0]["duration_ms"] - 2.5) < 1e-6
    assert len((await api.get("/api/v1/telemetry/logs", params={"since": "60d"})).json()) == 2
    deleted = mixer.ingest.apply_retention()  # default retention 7 days
    assert deleted == 1
    rows = (await api.get("/api/v1/telemetry/logs", params={"since": "60d"})).json()
    assert [r["body"] for r in rows] == ["fresh"]
    bad = await api.get("/api/v1/telemetry/logs", params={"since": "last tuesday"})
    assert bad.status_code == 400 and "since" in bad.json()["error"]


async def test_api_error_codes_and_auth_disabled(tmp_path):
    from mixer_fixtures import make_mixer

    m = await make_mixer(tmp_path / "open", **{"api.auth_disabled_dangerously": True})
    try:
        async with httpx.AsyncClient(base_url=m.api_url) as client:
            assert (await client.get("/api/v1/racks")).status_code == 200  # open, as configured
            assert (await client.post("/api/v1/racks/ghost/approve", json={})).status_code == 404
            assert (await client.get("/api/v1/scenarios/active")).status_code == 404
            r = await client.post(
                "/api/v1/scenarios/import", params={"format": "toml"}, content='[meta]\nname = "t"\nversion = "1"\n'
            )
            assert r.status_code == 200 and r.json()["status"] == "imported"
            raw = await client.get("/api/v1/scenarios/t", params={"raw": "true"})
            assert raw.headers["content-type"].startswith("application/toml") and 'name = "t"' in raw.text
            assert (await client.get("/api/v1/scenarios/nope")).status_code == 404
    finally:
        await m.stop()
    assert not os.path.exists(tmp_path / "open" / "api-token")
