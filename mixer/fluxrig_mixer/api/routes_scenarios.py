"""Routes: scenarios (import, list, the active one, the roll-out's progress, show, activate).

Every route needs the bearer token. An import is validated whole (400 listing every problem)
and stored by digest: importing the same document twice is a no-op. Activation sends each
Rack its projection in a new passport (409 when a Rack's projection does not validate).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from .services import GUARDED, Services

__all__ = [
    "router",
    "IMPORT_FORMATS",
    "HISTORY_SHOWN",
    "import_scenario",
    "list_scenarios",
    "active_scenario",
    "get_scenario",
    "activate_scenario",
    "rollout_progress",
]

IMPORT_FORMATS = ("yaml", "toml")
# Activations listed with the active scenario.
HISTORY_SHOWN = 20

router = APIRouter(prefix="/api/v1/scenarios", tags=["scenarios"], dependencies=GUARDED)


@router.post("/import")
async def import_scenario(
    services: Services,
    request: Request,
    dry_run: bool = False,
    activate: bool = False,
    format: str | None = Query(None, description="yaml or toml; default from Content-Type, else yaml"),
):
    """Body: the scenario document (YAML or TOML). dry_run validates only."""
    limit = services.config.api.max_import_bytes
    body = await request.body()
    if len(body) > limit:
        raise HTTPException(413, f"scenario of {len(body)} bytes exceeds api.max_import_bytes={limit}")
    ctype = request.headers.get("content-type", "")
    fmt = format or ("toml" if "toml" in ctype else "yaml")
    if fmt not in IMPORT_FORMATS:
        raise HTTPException(400, "format must be yaml or toml")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "scenario must be UTF-8 text") from None
    scenarios = services.scenarios
    # Parsed and validated in a child process with a time and memory budget (parse_worker.py):
    # a hostile or huge document costs that child, never the event loop.
    if dry_run:
        racks = [(r.name, r.labels) for r in services.registry.list()]
        checked = await scenarios.check_async(text, fmt, racks)
        doc = checked.doc
        return {
            "status": "valid",
            "name": (doc.get("meta") or {}).get("name"),
            "version": str((doc.get("meta") or {}).get("version")),
            "warnings": [{"location": p.location, "message": p.message} for p in checked.warnings],
        }
    stored, created = await scenarios.import_text_async(text, fmt)
    out = {"status": "imported" if created else "unchanged", **stored.summary()}
    if activate:
        out["activated"] = await services.controller.activate_scenario(stored)
        out["status"] = "imported_and_activated" if created else "activated"
    return out


@router.get("")
async def list_scenarios(services: Services, name: str | None = None):
    active = services.scenarios.active()
    return [
        {**s.summary(), "active": bool(active and active.digest == s.digest)} for s in services.scenarios.list(name)
    ]


# Before /{key}: routes match in the order they are declared.
@router.get("/active")
async def active_scenario(services: Services):
    active = services.scenarios.active()
    if active is None:
        raise HTTPException(404, "no active scenario")
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
            for r in services.registry.list()
        ],
        "history": services.scenarios.history(HISTORY_SHOWN),
    }


@router.get("/rollout")
async def rollout_progress(services: Services):
    """The roll-out of the last activation (issue 14 item 6), the same on every node: state
    (running, done, stopped), reason, the wave under way, per-wave results; 404 when none."""
    rollouts = getattr(services.controller, "rollouts", None)
    progress = rollouts.progress() if rollouts is not None else None
    if progress is None:
        raise HTTPException(404, "no roll-out yet: activate a scenario")
    return progress


@router.get("/{key}")
async def get_scenario(services: Services, key: str, raw: bool = False):
    stored = services.scenarios.get(key)
    if raw:
        media = "application/toml" if stored.source_format == "toml" else "application/yaml"
        return Response(stored.source_text, media_type=media)
    return {**stored.summary(), "document": stored.doc}


@router.post("/{key}/activate")
async def activate_scenario(services: Services, key: str):
    stored = services.scenarios.get(key)
    sent = await services.controller.activate_scenario(stored)
    return {"status": "activated", **stored.summary(), "racks": sent}
