"""Routes: the reversals a joined Rack owes (store and forward, issue 16; saf.py).

    GET  /api/v1/racks/{rack}/saf                    open and parked reversals (?state=open|parked, ?gear=)
    GET  /api/v1/racks/{rack}/saf/{saga}             one reversal with its trail (PAN masked)
    POST /api/v1/racks/{rack}/saf/{saga}/retry       send it again now
    POST /api/v1/racks/{rack}/saf/{saga}/park        give up on it (kept for settlement by hand)

Each sends a signed `saf` command and waits up to `wait` seconds (query parameter for reads,
body field for the two verbs) for the Rack's answer. Role-checked like the kill switch: any
valid token reads, retry and park need the `operate` role (services.require_token). Every
command is audited in rack_events with its caller. 404 an unknown Rack or reversal, 409 a
removed Rack or a parked reversal asked to retry, 503 the Mixer's bus is down, 504 the Rack did
not answer in time.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from fluxrig.ctrl import DEFAULT_COMMAND_TTL_S
from fluxrig.wire.vocab import SafOp

from ..saf import DEFAULT_SAF_WAIT_S, RackNoAnswer, SafClient
from .routes_commands import actor_of
from .services import GUARDED, Services

__all__ = ["router", "SafBody", "list_reversals", "show_reversal", "retry_reversal", "park_reversal", "STATES"]

router = APIRouter(prefix="/api/v1/racks", tags=["reversals"], dependencies=GUARDED)

STATES = ("all", "open", "parked")


class SafBody(BaseModel):
    reason: str = "operator request"  # why (logged by the Rack; for park, kept with the parked reversal)
    ttl: float = DEFAULT_COMMAND_TTL_S
    wait: float = DEFAULT_SAF_WAIT_S


async def _ask(services, request: Request, rack: str, op: str, **kw) -> dict:
    try:
        return await SafClient(services.commands).ask(rack, op, actor=actor_of(request), **kw)
    except RackNoAnswer as exc:
        raise HTTPException(504, str(exc)) from None


def _verdict(out: dict) -> dict:
    answer = out["answer"]
    detail = answer.get("detail", "")
    if out["status"] != "applied":
        if detail.startswith("no reversal") or detail.startswith("no conductor"):
            raise HTTPException(404, detail)
        if "settled by hand" in detail:
            raise HTTPException(409, detail)
        if detail.startswith("refused"):
            raise HTTPException(403, f"the Rack refused the command: {detail}")
        raise HTTPException(502, f"the Rack could not carry it out: {detail}")
    return out


@router.get("/{rack}/saf")
async def list_reversals(
    services: Services,
    request: Request,
    rack: str,
    state: str = "all",
    gear: str = "",
    wait: float = DEFAULT_SAF_WAIT_S,
):
    """The reversals the Rack's conductors owe (oldest first), then the parked ones."""
    if state not in STATES:
        raise HTTPException(400, f"state must be one of {', '.join(STATES)}, not {state!r}")
    out = _verdict(await _ask(services, request, rack, SafOp.LIST, gear=gear, wait=wait))
    rows = out["answer"]["rows"]
    if state != "all":
        rows = [r for r in rows if (r.get("state") == "parked") == (state == "parked")]
    return {"rack": out["rack"], "total": out["answer"]["total"], "rows": rows, "detail": out["answer"]["detail"]}


@router.get("/{rack}/saf/{saga}")
async def show_reversal(
    services: Services, request: Request, rack: str, saga: str, gear: str = "", wait: float = DEFAULT_SAF_WAIT_S
):
    """One reversal in full: summary, fields (PAN masked) and trail."""
    out = _verdict(await _ask(services, request, rack, SafOp.SHOW, saga=saga, gear=gear, wait=wait))
    return {"rack": out["rack"], **(out["answer"]["saga"] or {})}


@router.post("/{rack}/saf/{saga}/retry")
async def retry_reversal(services: Services, request: Request, rack: str, saga: str, body: SafBody | None = None):
    """Send an open reversal again now (one in flight: its answer is awaited first)."""
    body = body or SafBody()
    return _verdict(
        await _ask(services, request, rack, SafOp.RETRY, saga=saga, why=body.reason, ttl=body.ttl, wait=body.wait)
    )


@router.post("/{rack}/saf/{saga}/park")
async def park_reversal(services: Services, request: Request, rack: str, saga: str, body: SafBody | None = None):
    """Give up on an open reversal: parked with its trail for settlement by hand (durable when answered)."""
    body = body or SafBody()
    return _verdict(
        await _ask(services, request, rack, SafOp.PARK, saga=saga, why=body.reason, ttl=body.ttl, wait=body.wait)
    )
