"""What the API routes may use: one frozen `MixerServices`, handed to them by FastAPI.

Job. The routers (routes_*.py) declare the services they need as a parameter,
`services: Services`, which FastAPI fills from `app.state.services` (set once by
`create_app`). The routes never see the Mixer object: each part they may call is named here
with its type, so what the API can reach is written in one place and a test can build the app
over parts of its own.

Contract.
  - `MixerServices` is built by the Mixer once its parts run (`Mixer.services()`), before the
    API listens; it is immutable, the parts it names are not (the registry changes under it).
  - Route handlers that change state run on the event loop (the registry's owning thread);
    telemetry reads may run in the thread pool because `TelemetryQueries` takes the calling
    thread's own cursor.
  - `require_token` guards every route but GET /api/v1/health and the console's static files:
    a named API token (`Authorization: Bearer <token>`) or the console session cookie (with
    its CSRF token on state-changing calls), checked by `app.state.auth.check()` (auth.py, the
    same function the request guard calls before a body is read). Missing or wrong is 401
    with `WWW-Authenticate: Bearer`; a wrong CSRF token or a role too small is 403. With
    `api_token` None and api.auth_disabled_dangerously every route is open. The principal is
    left in `request.state.principal` for the audit trail.
  - The dependencies are `async def`: FastAPI runs a plain `def` dependency in the thread pool,
    a thread hop per request for a dictionary lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..commands import CommandSender
from ..config import MixerConfig
from ..controller import Controller
from ..queries import TelemetryQueries
from ..registry import Registry
from ..scenarios import ScenarioStore
from .auth import ROLE_ADMIN, ROLE_OPERATE, SAFE_METHODS, Principal

__all__ = [
    "MixerServices",
    "SnakeStatus",
    "IngestStats",
    "ClusterStatus",
    "Services",
    "get_services",
    "require_token",
    "require_admin",
    "GUARDED",
    "Caller",
    "Admin",
]


class SnakeStatus(Protocol):
    """What the API shows of the Snake (snake.SnakeSupervisor)."""

    @property
    def url(self) -> str: ...

    @property
    def running(self) -> bool: ...

    @property
    def restarts(self) -> int: ...

    @property
    def reloads(self) -> int: ...


class ClusterStatus(Protocol):
    """What the API shows of the cluster (cluster.ClusterView)."""

    async def status(self) -> dict: ...


class IngestStats(Protocol):
    """What the API shows of the telemetry ingest (ingest.TelemetryIngest)."""

    @property
    def stats(self) -> dict: ...


@dataclass(frozen=True, slots=True)
class MixerServices:
    """The parts of a running Mixer that the API routes use."""

    config: MixerConfig
    registry: Registry
    scenarios: ScenarioStore
    controller: Controller
    commands: CommandSender
    queries: TelemetryQueries
    ingest: IngestStats
    snake: SnakeStatus
    public_key_hex: str  # the cluster key's public half (passports are signed with it)
    api_token: str | None  # None only with api.auth_disabled_dangerously
    started_at: float  # time.time() when the Mixer started
    cluster: ClusterStatus | None = None  # issue 14: None on a single node (cluster.ClusterView)


async def get_services(request: Request) -> MixerServices:
    return request.app.state.services


Services = Annotated[MixerServices, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False)  # declares the scheme in the OpenAPI document (Swagger's Authorize)


def _refused(why: str) -> HTTPException:
    if why.startswith(("CSRF", "Origin")):
        return HTTPException(403, why)
    return HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})


async def require_token(
    request: Request, _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller (auth.Authenticator: a named bearer token or the console session cookie with
    its CSRF token); a state-changing method needs the `operate` role. 401 without valid
    credentials, 403 for a wrong CSRF token/Origin or a role too small."""
    principal, why = request.app.state.auth.check(request.headers, request.method)
    if principal is None:
        raise _refused(why)
    request.state.principal = principal  # read by the audit middleware
    if request.method not in SAFE_METHODS and not principal.has(ROLE_OPERATE):
        raise HTTPException(403, f"API token {principal.name!r} has role {principal.role!r}: it may only read")
    return principal


async def require_admin(principal: Annotated[Principal, Depends(require_token)]) -> Principal:
    if not principal.has(ROLE_ADMIN):
        raise HTTPException(403, f"API token {principal.name!r} has role {principal.role!r}; this needs admin")
    return principal


# `dependencies=GUARDED` on a router or route: valid credentials are required.
GUARDED = [Depends(require_token)]
# A route parameter `who: Caller` is the principal (FastAPI evaluates require_token once).
Caller = Annotated[Principal, Depends(require_token)]
Admin = Annotated[Principal, Depends(require_admin)]
