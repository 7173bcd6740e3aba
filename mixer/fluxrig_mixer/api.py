"""The control API (FastAPI, port 8090; OpenAPI document at /openapi.json, UI at /docs).

Auth: `Authorization: Bearer <token>` on every route except `GET /api/v1/health`, compared in
constant time; a missing or wrong token gets 401. That includes /docs, /openapi.json and
/metrics (Prometheus scrapes with `authorization: {credentials: ...}`). With
`api.auth_disabled_dangerously = true` and no token every route is open.

Errors are JSON `{"error": "...", "problems": [...]}`: 400 bad input (invalid scenario, bad
filter), 401 no/wrong token, 404 unknown Rack or scenario, 409 a transition the state machine
refuses, a taken name, or a scenario whose projections do not validate, 413 body too large,
503 the Snake is unreachable from the Mixer (a kill switch command was not sent).

Kill switch (commands.py): POST /api/v1/racks/{rack}/kill, /revive, /gears/{gear}/stop and
/connections/{conn_id}/close sign a command, send it and wait up to `wait` seconds for the
Rack to confirm: `status` is applied, refused, failed or sent (unconfirmed).

Route handlers that change state run on the event loop (the registry's thread); telemetry
queries run in the thread pool, each thread with its own DuckDB cursor.
"""

from __future__ import annotations

import hmac
import time

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from fluxrig.errors import FluxError, ScenarioError

from fluxrig.ctrl import CMD_CONN_CLOSE, CMD_GEAR_STOP, CMD_KILL, CMD_REVIVE, DEFAULT_COMMAND_TTL_S

from ._version import __version__
from .commands import DEFAULT_WAIT_S, CommandNotAllowed, SnakeUnavailable, send_command
from .controller import LOG_LEVELS
from .queries import query_logs, query_metrics, query_traces
from .registry import NameConflict, RackNotFound
from .scenarios import ScenarioNotFound, project
from .states import IllegalTransition

__all__ = ["create_app"]


class ApproveBody(BaseModel):
    name: str | None = None


class LogLevelBody(BaseModel):
    level: str


class ShutdownBody(BaseModel):
    reason: str = "operator request"


class CommandBody(BaseModel):
    reason: str = "operator request"
    ttl: float = DEFAULT_COMMAND_TTL_S  # seconds the signed command stays valid
    wait: float = DEFAULT_WAIT_S  # seconds to wait for the Rack's confirmation (0 = do not wait)


class ConnCloseBody(CommandBody):
    gear: str = ""  # the gear holding the connection; empty = every gear of the Rack


def _problem_list(exc: ScenarioError) -> list[dict]:
    return [{"location": p.location, "message": p.message} for p in exc.problems]


def create_app(mixer) -> FastAPI:
    bearer = HTTPBearer(auto_error=False)

    def auth(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = mixer.api_token
        if token is None and mixer.cfg.api.auth_disabled_dangerously:
            return
        if creds is None or creds.scheme.lower() != "bearer" or not hmac.compare_digest(
            creds.credentials.encode(), (token or "").encode()
        ):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="fluxrig Mixer control API",
        version=__version__,
        description="Racks, scenarios, telemetry of a fluxrig cluster. Bearer token on every route but /api/v1/health.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    guarded = [Depends(auth)]

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(FluxError)
    async def _flux(_req: Request, exc: FluxError):
        if isinstance(exc, (RackNotFound, ScenarioNotFound)):
            code = 404
        elif isinstance(exc, (IllegalTransition, NameConflict, CommandNotAllowed)):
            code = 409
        elif isinstance(exc, SnakeUnavailable):
            code = 503
        else:
            code = 400
        body = {"error": str(exc)}
        if isinstance(exc, ScenarioError):
            body["problems"] = _problem_list(exc)
        return JSONResponse(body, status_code=code)

    # -- docs (guarded) -------------------------------------------------------------------------

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="fluxrig Mixer API")

    # -- health ------------------------------------------------------------------------------------

    @app.get("/api/v1/health", tags=["mixer"])
    async def health():
        """Liveness; the only route without a token."""
        snake = mixer.snake
        return {
            "status": "ok",
            "version": __version__,
            "name": mixer.cfg.base.name,
            "uptime_s": round(time.time() - mixer.started_at, 1),
            "snake": {"running": bool(snake and snake.running), "restarts": snake.restarts if snake else 0},
        }

    # -- racks ---------------------------------------------------------------------------------------

    @app.get("/api/v1/racks", tags=["racks"], dependencies=guarded)
    async def list_racks(status: str | None = None, include_removed: bool = False):
        # JSONResponse directly: FastAPI's jsonable_encoder costs more than the query for 500 Racks.
        return JSONResponse([r.public() for r in mixer.registry.list(status=status, include_removed=include_removed)])

    @app.get("/api/v1/racks/{rack}", tags=["racks"], dependencies=guarded)
    async def get_rack(rack: str):
        row = mixer.registry.get(rack, include_removed=True)
        out = row.public()
        out["events"] = mixer.registry.events(row.rack_id, 50)
        return out

    @app.post("/api/v1/racks/{rack}/approve", tags=["racks"], dependencies=guarded)
    async def approve(rack: str, body: ApproveBody | None = None):
        return (await mixer.controller.approve(rack, body.name if body else None)).public()

    @app.post("/api/v1/racks/{rack}/suspend", tags=["racks"], dependencies=guarded)
    async def suspend(rack: str):
        return (await mixer.controller.suspend(rack)).public()

    @app.post("/api/v1/racks/{rack}/activate", tags=["racks"], dependencies=guarded)
    async def activate(rack: str):
        return (await mixer.controller.activate(rack)).public()

    @app.delete("/api/v1/racks/{rack}", tags=["racks"], dependencies=guarded)
    async def remove(rack: str):
        return (await mixer.controller.remove(rack)).public()

    @app.post("/api/v1/racks/{rack}/shutdown", tags=["racks"], dependencies=guarded)
    async def shutdown(rack: str, body: ShutdownBody | None = None):
        row = await mixer.controller.shutdown(rack, body.reason if body else "operator request")
        return {"status": "shutdown_sent", "rack": row.name}

    @app.post("/api/v1/racks/{rack}/log-level", tags=["racks"], dependencies=guarded)
    async def log_level(rack: str, body: LogLevelBody):
        if body.level not in LOG_LEVELS:
            raise HTTPException(400, f"unknown level {body.level!r}; use one of {', '.join(LOG_LEVELS)}")
        row = await mixer.controller.set_log_level(rack, body.level)
        return {"status": "ok", "rack": row.name, "level": body.level}

    # -- kill switch (signed commands, commands.py) ------------------------------------------------------

    def _cmd_args(body: CommandBody | None) -> dict:
        body = body or CommandBody()
        return {"reason": body.reason, "ttl": body.ttl, "wait": body.wait}

    @app.post("/api/v1/racks/{rack}/kill", tags=["kill switch"], dependencies=guarded)
    async def kill_rack(rack: str, body: CommandBody | None = None):
        """Stop every gear of the Rack and refuse new traffic, across restarts, until revived."""
        return await send_command(mixer, rack, CMD_KILL, **_cmd_args(body))

    @app.post("/api/v1/racks/{rack}/revive", tags=["kill switch"], dependencies=guarded)
    async def revive_rack(rack: str, body: CommandBody | None = None):
        """Clear a kill (and stopped gears): the Rack runs its passport's scenario again."""
        return await send_command(mixer, rack, CMD_REVIVE, **_cmd_args(body))

    @app.post("/api/v1/racks/{rack}/gears/{gear}/stop", tags=["kill switch"], dependencies=guarded)
    async def stop_gear(rack: str, gear: str, body: CommandBody | None = None):
        """Stop one gear (until revive or a Rack restart)."""
        return await send_command(mixer, rack, CMD_GEAR_STOP, gear=gear, **_cmd_args(body))

    @app.post("/api/v1/racks/{rack}/connections/{conn_id}/close", tags=["kill switch"], dependencies=guarded)
    async def close_connection(rack: str, conn_id: str, body: ConnCloseBody | None = None):
        """Close one connection (its conn.id) on the gear named, or on whichever gear holds it."""
        return await send_command(mixer, rack, CMD_CONN_CLOSE, conn_id=conn_id, gear=body.gear if body else "",
                                  **_cmd_args(body))

    # -- scenarios -------------------------------------------------------------------------------------

    @app.post("/api/v1/scenarios/import", tags=["scenarios"], dependencies=guarded)
    async def import_scenario(
        request: Request,
        dry_run: bool = False,
        activate: bool = False,
        format: str | None = Query(None, description="yaml or toml; default from Content-Type, else yaml"),
    ):
        """Body: the scenario document (YAML or TOML). dry_run validates only."""
        limit = mixer.cfg.api.max_import_bytes
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"scenario of {len(body)} bytes exceeds api.max_import_bytes={limit}")
        ctype = request.headers.get("content-type", "")
        fmt = format or ("toml" if "toml" in ctype else "yaml")
        if fmt not in ("yaml", "toml"):
            raise HTTPException(400, "format must be yaml or toml")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "scenario must be UTF-8 text") from None
        if dry_run:
            doc = mixer.scenarios.check(text, fmt)
            racks = [(r.name, r.labels) for r in mixer.registry.list()]
            problems = mixer.scenarios.projection_problems(doc, racks)
            return {
                "status": "valid",
                "name": (doc.get("meta") or {}).get("name"),
                "version": str((doc.get("meta") or {}).get("version")),
                "warnings": [{"location": p.location, "message": p.message} for p in problems],
            }
        stored, created = mixer.scenarios.import_text(text, fmt)
        out = {"status": "imported" if created else "unchanged", **stored.summary()}
        if activate:
            out["activated"] = await mixer.controller.activate_scenario(stored)
            out["status"] = "imported_and_activated" if created else "activated"
        return out

    @app.get("/api/v1/scenarios", tags=["scenarios"], dependencies=guarded)
    async def list_scenarios(name: str | None = None):
        active = mixer.scenarios.active()
        return [
            {**s.summary(), "active": bool(active and active.digest == s.digest)} for s in mixer.scenarios.list(name)
        ]

    @app.get("/api/v1/scenarios/active", tags=["scenarios"], dependencies=guarded)
    async def active_scenario():
        active = mixer.scenarios.active()
        if active is None:
            raise HTTPException(404, "no active scenario")
        racks = mixer.registry.list()
        return {
            **active.summary(),
            "document": active.doc,
            "racks": [
                {
                    "rack": r.name,
                    "status": r.status,
                    "target": r.target_version,
                    "version": r.scenario_version,
                    "apply_state": r.apply_state,
                    "reason": r.apply_reason,
                }
                for r in racks
            ],
            "history": mixer.scenarios.history(20),
        }

    @app.get("/api/v1/scenarios/{key}", tags=["scenarios"], dependencies=guarded)
    async def get_scenario(key: str, raw: bool = False):
        stored = mixer.scenarios.get(key)
        if raw:
            media = "application/toml" if stored.source_format == "toml" else "application/yaml"
            return Response(stored.source_text, media_type=media)
        return {**stored.summary(), "document": stored.doc}

    @app.post("/api/v1/scenarios/{key}/activate", tags=["scenarios"], dependencies=guarded)
    async def activate_scenario(key: str):
        stored = mixer.scenarios.get(key)
        sent = await mixer.controller.activate_scenario(stored)
        return {"status": "activated", **stored.summary(), "racks": sent}

    # -- telemetry (thread pool: own cursor per thread) -------------------------------------------------

    @app.get("/api/v1/telemetry/logs", tags=["telemetry"], dependencies=guarded)
    def telemetry_logs(
        since: str | None = None,
        until: str | None = None,
        rack: str | None = None,
        min_level: str | None = Query(None, description="threshold: trace, debug, info, warn, error, fatal"),
        q: str | None = Query(None, description="case-insensitive text search in body and attributes"),
        limit: int = 100,
    ):
        return JSONResponse(
            query_logs(mixer.db.cursor(), since=since, until=until, rack=rack, min_level=min_level, q=q, limit=limit)
        )

    @app.get("/api/v1/telemetry/metrics", tags=["telemetry"], dependencies=guarded)
    def telemetry_metrics(
        name: str | None = Query(None, description="exact name, or a prefix ending in *"),
        rack: str | None = None,
        since: str | None = None,
        until: str | None = None,
        bucket: str | None = Query(None, description="aggregate per time bucket, e.g. 1m"),
        limit: int = 100,
    ):
        return JSONResponse(
            query_metrics(mixer.db.cursor(), name=name, rack=rack, since=since, until=until, bucket=bucket, limit=limit)
        )

    @app.get("/api/v1/telemetry/traces", tags=["telemetry"], dependencies=guarded)
    def telemetry_traces(
        rack: str | None = None,
        trace_id: str | None = None,
        name: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
    ):
        return JSONResponse(
            query_traces(mixer.db.cursor(), rack=rack, trace_id=trace_id, name=name, since=since, until=until, limit=limit)
        )

    # -- topology and metrics ------------------------------------------------------------------------------

    @app.get("/api/v1/topology", tags=["mixer"], dependencies=guarded)
    async def topology():
        active = mixer.scenarios.active()
        racks = []
        for r in mixer.registry.list():
            entry = {"id": r.rack_id, "name": r.name, "status": r.status, "last_seen": r.public()["last_seen"],
                     "scenario": r.public()["scenario"], "gears": [], "remote_wires": []}
            if active is not None and r.status in ("active", "offline"):
                proj = project(active.doc, r.name, r.labels)
                entry["gears"] = [g["name"] for g in proj["gears"]]
                entry["remote_wires"] = proj.get("x-remote-wires", [])
            racks.append(entry)
        return JSONResponse({
            "mixer": {"name": mixer.cfg.base.name, "version": __version__, "public_key": mixer.key.public_hex},
            "snake": {"url": mixer.snake.url, "running": mixer.snake.running, "restarts": mixer.snake.restarts},
            "active_scenario": active.summary() if active else None,
            "racks": racks,
        })

    @app.get("/metrics", tags=["mixer"], dependencies=guarded, response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_prometheus(mixer), media_type="text/plain; version=0.0.4")

    return app


def _prometheus(mixer) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    counts = mixer.registry.counts()
    metric("fluxrig_mixer_racks", "gauge", "Racks by status",
           [({"status": s}, counts.get(s, 0)) for s in ("pending", "active", "offline", "suspended", "removed")])
    apply_counts: dict[str, int] = {}
    for r in mixer.registry.list():
        apply_counts[r.apply_state] = apply_counts.get(r.apply_state, 0) + 1
    metric("fluxrig_mixer_rack_scenario_apply", "gauge", "Racks by scenario apply state",
           [({"state": s}, n) for s, n in sorted(apply_counts.items())])
    c = mixer.controller.counters
    metric("fluxrig_mixer_hello_total", "counter", "Hello requests by outcome",
           [({"result": "ok"}, c["hello_ok"]), ({"result": "denied"}, c["hello_denied"]), ({"result": "malformed"}, c["hello_bad"])])
    metric("fluxrig_mixer_heartbeats_total", "counter", "Heartbeats received", [({}, c["heartbeats"])])
    snake = mixer.snake
    metric("fluxrig_mixer_snake_up", "gauge", "1 when nats-server accepts connections", [({}, 1 if snake.running else 0)])
    metric("fluxrig_mixer_snake_restarts_total", "counter", "nats-server restarts after it died", [({}, snake.restarts)])
    metric("fluxrig_mixer_snake_reloads_total", "counter", "nats-server config reloads (users changed)", [({}, snake.reloads)])
    st = mixer.ingest.stats if mixer.ingest else {"rows": {}, "duplicates": {}, "rejected_batches": 0, "messages": 0}
    metric("fluxrig_mixer_telemetry_rows_total", "counter", "Telemetry rows stored",
           [({"kind": k}, st["rows"].get(k, 0)) for k in ("logs", "metrics", "traces")])
    metric("fluxrig_mixer_telemetry_duplicates_total", "counter", "Telemetry rows dropped as re-sends",
           [({"kind": k}, st["duplicates"].get(k, 0)) for k in ("logs", "metrics", "traces")])
    metric("fluxrig_mixer_telemetry_messages_total", "counter", "Telemetry bus messages consumed", [({}, st["messages"])])
    metric("fluxrig_mixer_telemetry_rejected_batches_total", "counter", "Telemetry batches that could not be stored",
           [({}, st["rejected_batches"])])
    metric("fluxrig_mixer_uptime_seconds", "gauge", "Seconds since the Mixer started", [({}, round(time.time() - mixer.started_at, 3))])
    return "\n".join(lines) + "\n"
