"""fluxrig_mixer.api over a MixerServices built by hand: real registry and scenario store on a
real DuckDB file, no Mixer object, no nats-server. The Snake and the ingest are given by their
shape (SnakeStatus, IngestStats): two small dataclasses. The bus is absent, so a kill switch
command answers 503 (nothing was sent), as it does when the Mixer's connection is down.

Requests go through httpx's ASGI transport: the app itself, not a server (the e2e suites
drive the real uvicorn server on loopback)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
from fluxrig_mixer.api import MixerServices, create_app
from fluxrig_mixer.commands import CommandSender
from fluxrig_mixer.config import load_config
from fluxrig_mixer.controller import Controller
from fluxrig_mixer.ingest import ensure_tables
from fluxrig_mixer.queries import TelemetryQueries
from fluxrig_mixer.registry import Database, Registry
from fluxrig_mixer.scenarios import ScenarioStore

from fluxrig.passport import ClusterKey

TOKEN = "t0ken"


def _nkey() -> str:
    """A fresh Rack bus identity (its public NKey), as a Hello brings it."""
    from fluxrig.wire import identity

    return identity.public_key(identity.new_user_seed())


@dataclass
class SnakeShown:
    url: str = "nats://127.0.0.1:1"
    running: bool = True
    restarts: int = 3
    reloads: int = 7


@dataclass
class IngestShown:
    stats: dict = field(
        default_factory=lambda: {
            "rows": {"logs": 5},
            "duplicates": {},
            "messages": 2,
            "rejected_batches": 1,
        }
    )


def _services(tmp_path, token: str | None = TOKEN, **config) -> tuple[MixerServices, Database]:
    cfg = load_config(None, environ={}, overrides={"base.state_dir": str(tmp_path), **config})
    db = Database(str(tmp_path / "mixer.duckdb"))
    ensure_tables(db)
    registry = Registry(db)
    scenarios = ScenarioStore(db)
    key = ClusterKey.load_or_create(str(tmp_path / "cluster.key"))
    controller = Controller(registry=registry, scenarios=scenarios, key=key, bootstrap_token="b", mixer_name="m")
    services = MixerServices(
        config=cfg,
        registry=registry,
        scenarios=scenarios,
        controller=controller,
        commands=CommandSender(registry, key, None),
        queries=TelemetryQueries(db),
        ingest=IngestShown(),
        snake=SnakeShown(),
        public_key_hex=key.public_hex,
        api_token=token,
        started_at=time.time() - 10,
    )
    return services, db


def _client(services: MixerServices, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(services)), base_url="http://t", headers=headers
    )


async def test_routes_read_the_services_they_are_given(tmp_path):
    services, db = _services(tmp_path)
    services.registry.create("edge-1", host="h1", adopted=True, nkey=_nkey())
    try:
        async with _client(services) as api:
            health = (await api.get("/api/v1/health")).json()
            assert health["snake"] == {"running": True, "restarts": 3} and health["uptime_s"] >= 10
            racks = (await api.get("/api/v1/racks")).json()
            assert [(r["name"], r["status"], r["host"]) for r in racks] == [("edge-1", "active", "h1")]
            one = (await api.get("/api/v1/racks/edge-1")).json()
            assert one["events"][0]["event"] == "enroll_adopted"
            prom = (await api.get("/metrics")).text
            assert 'fluxrig_mixer_racks{status="active"} 1' in prom
            assert "fluxrig_mixer_snake_restarts_total 3" in prom and "fluxrig_mixer_snake_reloads_total 7" in prom
            assert 'fluxrig_mixer_telemetry_rows_total{kind="logs"} 5' in prom
            topo = (await api.get("/api/v1/topology")).json()
            assert topo["mixer"]["public_key"] == services.public_key_hex
            assert (await api.get("/api/v1/telemetry/logs", params={"rack": "edge-1"})).json() == []
            r = await api.get("/api/v1/telemetry/metrics", params={"bucket": "zz"})
            assert r.status_code == 400 and r.json()["error"].startswith("bucket:")
    finally:
        db.close()


async def test_errors_map_to_statuses_and_no_bus_means_503(tmp_path):
    services, db = _services(tmp_path)
    row = services.registry.create("edge-1", nkey=_nkey())
    try:
        async with _client(services) as api:
            assert (await api.get("/api/v1/racks/nope")).status_code == 404
            assert (await api.get("/api/v1/scenarios/active")).status_code == 404
            r = await api.post("/api/v1/racks/edge-1/activate")  # pending -> activate is not a move
            assert r.status_code == 409 and "pending" in r.json()["error"]
            r = await api.post("/api/v1/racks/edge-1/kill", json={"reason": "test"})
            assert r.status_code == 503 and "nothing was sent" in r.json()["error"]
            # Kill state is level-triggered (issue 12.5): the desired state is recorded even with
            # the bus down, and audited as not sent; the Rack gets it in a heartbeat reply.
            assert "desired kill state is recorded (serial 1)" in r.json()["error"]
            events = services.registry.events(row.rack_id)
            assert [e["event"] for e in events] == ["ctrl.kill", "enroll"]
            assert "not-sent=bus-down" in events[0]["detail"] and "by=" in events[0]["detail"]
            assert services.commands.kill_states.get(row.rack_id).killed
            r = await api.post("/api/v1/scenarios/import", content=b"meta: {name: x}\n")
            assert r.status_code == 400 and r.json()["problems"][0]["location"] == "meta.version"
    finally:
        db.close()


async def test_every_route_but_health_needs_the_token(tmp_path):
    services, db = _services(tmp_path)
    try:
        async with _client(services) as api:
            paths = list((await api.get("/openapi.json")).json()["paths"])
        # Every listed route is checked below; login (POST only) answers 405 to a GET.
        assert "/api/v1/health" in paths and len(paths) >= 22
        async with _client(services, token="wrong") as anon:
            assert (await anon.get("/api/v1/health")).status_code == 200
            for path in [p for p in paths if "{" not in p and p != "/api/v1/health"] + ["/docs", "/openapi.json"]:
                r = await anon.get(path)
                assert r.status_code in (401, 405), path
                if r.status_code == 401:
                    assert r.headers["www-authenticate"] == "Bearer"
    finally:
        db.close()


async def test_no_token_with_auth_disabled_dangerously_opens_every_route(tmp_path):
    services, db = _services(tmp_path, token=None, **{"api.auth_disabled_dangerously": True})
    try:
        async with _client(services, token=None) as api:
            assert (await api.get("/api/v1/racks")).status_code == 200
            assert (await api.get("/metrics")).status_code == 200
    finally:
        db.close()
