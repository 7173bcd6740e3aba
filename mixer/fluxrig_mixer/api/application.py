"""The control API application: `create_app(services)` (FastAPI; port 8090 by default).

Job. Build the FastAPI app over a `MixerServices` (services.py): the routers of routes_*.py
(one per area: racks, kill switch, scenarios, telemetry, the Mixer itself), the guarded docs
(/docs, /openapi.json), and one error mapping for every route.

Errors are JSON `{"error": "...", "problems": [...]}`: 400 bad input (invalid scenario, bad
filter), 401 no/wrong token, 404 unknown Rack or scenario, 409 a transition the state machine
refuses, a taken name, or a scenario whose projections do not validate, 413 body too large,
503 the Snake is unreachable from the Mixer (a kill switch command was not sent). The status
of a FluxError is the first row of ERROR_STATUS it is an instance of, else 400.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from fluxrig.errors import FluxError, ScenarioError

from .._version import __version__
from ..commands import CommandNotAllowed, SnakeUnavailable
from ..kv import StateConflict, StateUnavailable
from ..registry import NameConflict, RackNotFound
from ..scenarios import ScenarioNotFound
from ..states import IllegalTransition
from . import (
    routes_auth,
    routes_cluster,
    routes_commands,
    routes_console,
    routes_docs,
    routes_health,
    routes_racks,
    routes_saf,
    routes_scenarios,
    routes_telemetry,
)
from .auth import (
    SESSION_COOKIE,
    AuditLog,
    AuditMiddleware,
    Authenticator,
    AuthError,
    RefusalAudit,
    TokenNotFound,
    TokenStore,
)
from .services import GUARDED, MixerServices
from .sessions import SessionRefreshMiddleware, SessionStore, session_key

__all__ = [
    "create_app",
    "ERROR_STATUS",
    "ROUTERS",
    "DEFAULT_ERROR_STATUS",
]

# (error class, HTTP status): first match wins; any other FluxError is a 400.
ERROR_STATUS: tuple[tuple[type[FluxError], int], ...] = (
    (RackNotFound, 404),
    (ScenarioNotFound, 404),
    (IllegalTransition, 409),
    (NameConflict, 409),
    (StateConflict, 409),  # another Mixer node changed it first (kv.py); nothing written
    (StateUnavailable, 503),  # no quorum from this node; nothing written
    (CommandNotAllowed, 409),
    (SnakeUnavailable, 503),
    (TokenNotFound, 404),
    (AuthError, 400),
)
DEFAULT_ERROR_STATUS = 400

# Order matters only where paths overlap; each router keeps its own routes in order.
ROUTERS = (
    routes_health,
    routes_racks,
    routes_commands,
    routes_saf,  # reversals a joined Rack owes (issue 16)
    routes_scenarios,
    routes_telemetry,
    routes_auth,
    routes_console,
    routes_cluster,
    routes_docs,
)


def _status_of(exc: FluxError) -> int:
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return DEFAULT_ERROR_STATUS


async def _http_error(_req: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _flux_error(_req: Request, exc: FluxError) -> JSONResponse:
    body: dict = {"error": str(exc)}
    if isinstance(exc, ScenarioError):
        body["problems"] = [{"location": p.location, "message": p.message} for p in exc.problems]
    if isinstance(getattr(exc, "field", None), str):  # the request field at fault (InvalidRackName)
        body["field"] = exc.field
    return JSONResponse(body, status_code=_status_of(exc))


def create_app(services: MixerServices) -> FastAPI:
    """The API over `services`; bearer token on every route but GET /api/v1/health."""
    app = FastAPI(
        title="fluxrig Mixer control API",
        version=__version__,
        description="Racks, scenarios, telemetry of a fluxrig cluster. Bearer token on every route but /api/v1/health.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.services = services
    # Operator identity (auth.py): named tokens (digests in mixer.duckdb) + console sessions.
    cfg = services.config
    db = getattr(services.registry, "db", None)
    # Sessions are signed cookies (sessions.py), keyed from the cluster key: a restarted Mixer,
    # or any Mixer of the cluster, accepts them.
    cluster_key = getattr(services.controller, "key", None)
    sessions = SessionStore(
        cfg.console.session_ttl,
        cfg.console.session_idle,
        key=session_key(cluster_key) if cluster_key is not None else None,
        db=db,
    )
    app.state.auth = Authenticator(
        TokenStore(db, services.api_token),
        sessions,
        open_access=services.api_token is None and cfg.api.auth_disabled_dangerously,
    )
    app.state.audit = AuditLog(db)
    app.state.refusals = RefusalAudit(app.state.audit)  # shared with the front door (_guard)
    app.add_middleware(SessionRefreshMiddleware, sessions=sessions, cookie_name=SESSION_COOKIE)
    app.add_middleware(AuditMiddleware, audit=app.state.audit, refusals=app.state.refusals)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(FluxError, _flux_error)

    @app.get("/openapi.json", include_in_schema=False, dependencies=GUARDED)
    async def openapi():
        return JSONResponse(app.openapi())

    for module in ROUTERS:
        app.include_router(module.router)
    _guard(app, services)
    return app


def _guard(app: FastAPI, services: MixerServices) -> None:
    """The front door (guard.py): credentials before body, body caps, in-flight cap."""
    from .feed import EVENTS_PATH
    from .guard import EXEMPT_FROM_REQUEST_CAP, GuardMiddleware

    api = services.config.api
    # Added last, so outermost: nothing inside runs for a refused body; its refusals are
    # audited by RefusalAudit, bounded per client address (auth.REFUSAL_AUDIT_WINDOW_S).
    app.add_middleware(
        GuardMiddleware,
        on_refused=app.state.refusals,
        max_body_bytes=api.max_body_bytes,
        route_limits={"/api/v1/scenarios/import": api.max_import_bytes},
        body_timeout=api.body_timeout,
        max_requests=api.max_requests,
        # A console page holds its event stream open for hours: it must not take a request
        # slot for that long (64 open consoles would make the API busy). The feed caps its
        # own streams instead (feed.MAX_STREAMS, 503 past it).
        exempt=EXEMPT_FROM_REQUEST_CAP | {EVENTS_PATH},
    )
