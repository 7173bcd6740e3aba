"""Routes: the Rack registry (list, show, approve, suspend, activate, rename, remove, shutdown,
log level).

Every route needs the bearer token (state-changing ones the `operate` role; each call is an
`api_audit` row). Status changes and renames go through the controller (the state machine in
states.py, 409 on a move it refuses) and reach the Rack as a new passport. A rename's
rack_events entry names its caller (`by=`), like the signed commands.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..controller import LOG_LEVELS
from .routes_commands import actor_of  # signed shutdown / log-level are audited with their caller
from .services import GUARDED, Services

__all__ = [
    "router",
    "ApproveBody",
    "RenameBody",
    "LogLevelBody",
    "ShutdownBody",
    "RACK_EVENTS_SHOWN",
    "list_racks",
    "get_rack",
    "approve",
    "suspend",
    "activate",
    "rename",
    "remove",
    "shutdown",
    "log_level",
]

# Status history entries returned with one Rack.
RACK_EVENTS_SHOWN = 50

router = APIRouter(prefix="/api/v1/racks", tags=["racks"], dependencies=GUARDED)


class ApproveBody(BaseModel):
    name: str | None = None


class RenameBody(BaseModel):
    name: str | None = None  # required; checked in the route so a missing one is a 400 naming it


class LogLevelBody(BaseModel):
    level: str


class ShutdownBody(BaseModel):
    reason: str = "operator request"


@router.get("")
async def list_racks(services: Services, status: str | None = None, include_removed: bool = False):
    # JSONResponse directly: FastAPI's jsonable_encoder costs more than the query for 500 Racks.
    rows = services.registry.list(status=status, include_removed=include_removed)
    return JSONResponse([r.public() for r in rows])


@router.get("/{rack}")
async def get_rack(services: Services, rack: str):
    row = services.registry.get(rack, include_removed=True)
    out = row.public()
    out["events"] = services.registry.events(row.rack_id, RACK_EVENTS_SHOWN)
    return out


@router.post("/{rack}/approve")
async def approve(services: Services, rack: str, body: ApproveBody | None = None):
    return (await services.controller.approve(rack, body.name if body else None)).public()


@router.post("/{rack}/suspend")
async def suspend(services: Services, rack: str):
    return (await services.controller.suspend(rack)).public()


@router.post("/{rack}/activate")
async def activate(services: Services, rack: str):
    return (await services.controller.activate(rack)).public()


@router.post("/{rack}/rename")
async def rename(services: Services, request: Request, rack: str, body: RenameBody | None = None):
    """Rename a Rack in any status but removed (its status stays). 400 `name` missing or
    invalid (a-z, 0-9, _ and -, at most 63), 409 taken by another Rack or the Rack removed."""
    if body is None or not body.name:
        raise HTTPException(400, 'name: give the new rack name, e.g. {"name": "edge-2"}')
    return (await services.controller.rename(rack, body.name, actor_of(request))).public()


@router.delete("/{rack}")
async def remove(services: Services, rack: str):
    return (await services.controller.remove(rack)).public()


@router.post("/{rack}/shutdown")
async def shutdown(services: Services, request: Request, rack: str, body: ShutdownBody | None = None):
    row = await services.controller.shutdown(rack, body.reason if body else "operator request", actor_of(request))
    return {"status": "shutdown_sent", "rack": row.name}


@router.post("/{rack}/log-level")
async def log_level(services: Services, request: Request, rack: str, body: LogLevelBody):
    if body.level not in LOG_LEVELS:
        raise HTTPException(400, f"unknown level {body.level!r}; use one of {', '.join(LOG_LEVELS)}")
    row = await services.controller.set_log_level(rack, body.level, actor_of(request))
    return {"status": "ok", "rack": row.name, "level": body.level}
