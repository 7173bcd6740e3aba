"""Routes: telemetry reads (logs, metrics, traces) and Parquet export, from the configured store.

Every route needs the bearer token. The handlers are plain `def`: FastAPI runs them in its
thread pool, so a slow query never stalls the event loop (heartbeats, Hello, the other
routes); the queries object gives each thread its own cursor or connection. Filters are
described in queries.py and mean the same for DuckDB and ClickHouse; a wrong one is a 400
naming the parameter.

Pagination: the body stays a JSON array (newest first). When more rows follow, the response
carries `X-Next-Cursor: <token>` and `Link: <same query with cursor=token>; rel="next"`;
pass the token back as `cursor` to read on.

Export: GET /api/v1/telemetry/export?kind=logs&since=...&until=... answers a Parquet file of
every stored row of that kind in the window (all columns, oldest first), from either backend.
"""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from .services import GUARDED, Services

__all__ = [
    "router",
    "telemetry_logs",
    "telemetry_metrics",
    "telemetry_traces",
    "telemetry_export",
    "NEXT_CURSOR_HEADER",
]

router = APIRouter(prefix="/api/v1/telemetry", tags=["telemetry"], dependencies=GUARDED)

NEXT_CURSOR_HEADER = "X-Next-Cursor"
_CURSOR_DOC = "the X-Next-Cursor of the previous page, to read the rows after it"


def _page(request: Request, rows) -> JSONResponse:
    resp = JSONResponse(rows)
    token = getattr(rows, "next_cursor", None)
    if token:
        resp.headers[NEXT_CURSOR_HEADER] = token
        resp.headers["Link"] = f'<{request.url.include_query_params(cursor=token)}>; rel="next"'
    return resp


@router.get("/logs")
def telemetry_logs(
    request: Request,
    services: Services,
    since: str | None = None,
    until: str | None = None,
    rack: str | None = None,
    min_level: str | None = Query(None, description="threshold: trace, debug, info, warn, error, fatal"),
    q: str | None = Query(None, description="case-insensitive text search in body and attributes (literal)"),
    limit: int = 100,
    cursor: str | None = Query(None, description=_CURSOR_DOC),
):
    rows = services.queries.logs(
        since=since, until=until, rack=rack, min_level=min_level, q=q, limit=limit, cursor=cursor
    )
    return _page(request, rows)


@router.get("/metrics")
def telemetry_metrics(
    request: Request,
    services: Services,
    name: str | None = Query(None, description="exact name, or a prefix ending in *"),
    rack: str | None = None,
    since: str | None = None,
    until: str | None = None,
    bucket: str | None = Query(None, description="aggregate per time bucket, e.g. 1m"),
    limit: int = 100,
    cursor: str | None = Query(None, description=_CURSOR_DOC),
):
    rows = services.queries.metrics(
        name=name, rack=rack, since=since, until=until, bucket=bucket, limit=limit, cursor=cursor
    )
    return _page(request, rows)


@router.get("/traces")
def telemetry_traces(
    request: Request,
    services: Services,
    rack: str | None = None,
    trace_id: str | None = None,
    name: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 100,
    cursor: str | None = Query(None, description=_CURSOR_DOC),
):
    rows = services.queries.traces(
        rack=rack, trace_id=trace_id, name=name, since=since, until=until, limit=limit, cursor=cursor
    )
    return _page(request, rows)


@router.get("/export")
def telemetry_export(
    services: Services,
    kind: str = Query(..., description="logs, metrics or traces"),
    since: str | None = None,
    until: str | None = None,
):
    fd, path = tempfile.mkstemp(prefix="fluxrig-export-", suffix=".parquet")
    os.close(fd)
    os.unlink(path)  # the writer creates it
    try:
        rows = services.queries.export_parquet(kind, path, since=since, until=until)
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    return FileResponse(
        path,
        media_type="application/vnd.apache.parquet",
        filename=f"fluxrig-{kind}.parquet",
        headers={"X-Rows": str(rows)},
        background=BackgroundTask(os.unlink, path),
    )
