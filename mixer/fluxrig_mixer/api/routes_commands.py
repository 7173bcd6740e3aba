"""Routes: the kill switch (signed commands, commands.py).

POST /api/v1/racks/{rack}/kill, /revive, /gears/{gear}/stop and /connections/{conn_id}/close
sign a command, send it and wait up to `wait` seconds for the Rack to confirm: `status` is
applied, refused, failed or sent (unconfirmed). Every route needs the bearer token; 503 when
the Mixer's bus connection is down (nothing was sent; a kill or revive's desired state is
recorded and reaches the Rack in a heartbeat reply). Each command is audited with its caller:
the name of the API token or console session (`request.state.principal`, api/auth.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from fluxrig.ctrl import CMD_CONN_CLOSE, CMD_GEAR_STOP, CMD_KILL, CMD_REVIVE, DEFAULT_COMMAND_TTL_S

from ..commands import DEFAULT_WAIT_S
from .services import GUARDED, Services

__all__ = [
    "router",
    "CommandBody",
    "ConnCloseBody",
    "kill_rack",
    "revive_rack",
    "stop_gear",
    "close_connection",
    "actor_of",
]

router = APIRouter(prefix="/api/v1/racks", tags=["kill switch"], dependencies=GUARDED)


class CommandBody(BaseModel):
    reason: str = "operator request"
    ttl: float = DEFAULT_COMMAND_TTL_S  # seconds the signed command stays valid
    wait: float = DEFAULT_WAIT_S  # seconds to wait for the Rack's confirmation (0 = do not wait)


class ConnCloseBody(CommandBody):
    gear: str = ""  # the gear holding the connection; empty = every gear of the Rack


def actor_of(request: Request) -> str:
    """Who asked, for the audit rows: the principal's token or session name."""
    principal = getattr(request.state, "principal", None)
    return f"{principal.name} ({principal.via})" if principal is not None else "unknown"


def _cmd_args(body: CommandBody | None, request: Request) -> dict:
    body = body or CommandBody()
    return {"reason": body.reason, "ttl": body.ttl, "wait": body.wait, "actor": actor_of(request)}


@router.post("/{rack}/kill")
async def kill_rack(services: Services, request: Request, rack: str, body: CommandBody | None = None):
    """Stop every gear of the Rack and refuse new traffic, across restarts, until revived."""
    return await services.commands.send(rack, CMD_KILL, **_cmd_args(body, request))


@router.post("/{rack}/revive")
async def revive_rack(services: Services, request: Request, rack: str, body: CommandBody | None = None):
    """Clear a kill (and stopped gears): the Rack runs its passport's scenario again."""
    return await services.commands.send(rack, CMD_REVIVE, **_cmd_args(body, request))


@router.post("/{rack}/gears/{gear}/stop")
async def stop_gear(services: Services, request: Request, rack: str, gear: str, body: CommandBody | None = None):
    """Stop one gear (until revive or a Rack restart)."""
    return await services.commands.send(rack, CMD_GEAR_STOP, gear=gear, **_cmd_args(body, request))


@router.post("/{rack}/connections/{conn_id}/close")
async def close_connection(
    services: Services, request: Request, rack: str, conn_id: str, body: ConnCloseBody | None = None
):
    """Close one connection (its conn.id) on the gear named, or on whichever gear holds it."""
    gear = body.gear if body else ""
    return await services.commands.send(rack, CMD_CONN_CLOSE, conn_id=conn_id, gear=gear, **_cmd_args(body, request))
