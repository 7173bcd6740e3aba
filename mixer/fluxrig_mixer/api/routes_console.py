"""Routes: the web console at /console (static files shipped in the package) and what it reads.

Job. Serve the console's files (fluxrig_mixer/console/: one HTML page, one script, one style
sheet, one icon; no CDN, no external font, nothing fetched from elsewhere) with a strict
Content-Security-Policy, and the few read models the API does not already have:

  GET /console, /console/<file>   the app (no credentials: it holds no data; it logs in)
  GET /                           redirects to /console
  GET /api/v1/events              server-sent events (feed.py): the fleet, with ?rack=<name>
                                  that Rack's detail, with ?logs=1 the log tail (log_rack,
                                  min_level, q, since filter it)
  GET /api/v1/console/racks/{rack}/graph   the Rack's scenario projection as a graph: gears
                                  with ports (from the gear type's manifest), wires, wires
                                  to/from other Racks marked, counters per gear
  GET /api/v1/console/series      rates per time bucket of gear counters (messages in/out,
                                  errors) per gear or per Rack, or the average of any metric
  POST /api/v1/console/check      validate a scenario text without storing it: problems with
                                  the line they name (YAML node positions), projection
                                  warnings per registered Rack

Every data route needs credentials (services.require_token); /console itself does not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.resources
import json
import re

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from fluxrig.durations import parse_duration
from fluxrig.errors import ScenarioError

from ..scenarios import project
from .feed import EVENTS_PATH, MAX_STREAMS, FleetFeed, log_stream, rack_stream
from .services import Caller, Services

__all__ = [
    "router",
    "CONSOLE_FILES",
    "CONSOLE_CSP",
    "SERIES_COUNTERS",
    "MAX_SERIES_POINTS",
    "MAX_CHECK_BYTES",
    "root",
    "console_file",
    "events",
    "rack_graph",
    "series",
    "check_scenario",
    "locate",
    "feed_of",
]

# name -> content type; nothing else under /console is served (no directory walking).
CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SERIES_COUNTERS = ("flux.gear.messages_in", "flux.gear.messages_out", "flux.gear.errors")
MAX_SERIES_POINTS = 2000
MAX_CHECK_BYTES = 10 * 1024 * 1024
_SERIES_ROWS = 10_000  # rows read per metric name (queries.MAX_LIMIT)

router = APIRouter()


class _Files:
    """The console's files, read once from the package (works frozen by PyInstaller too).
    index.html names the others with `?v=<their digest>`, so they may be cached for good
    (a new Mixer version changes the digest, hence the URL) and a reload costs one request."""

    def __init__(self):
        self.data: dict[str, tuple[bytes, str]] = {}

    def _read(self, name: str) -> bytes:
        return importlib.resources.files("fluxrig_mixer").joinpath("console", name).read_bytes()

    def get(self, name: str) -> tuple[bytes, str] | None:
        if name not in CONSOLE_FILES:
            return None
        if name not in self.data:
            body = self._read(name)
            if name == "index.html":
                for other in CONSOLE_FILES:
                    if other != "index.html":
                        body = body.replace(
                            f'/console/{other}"'.encode(), f'/console/{other}?v={self.version(other)}"'.encode()
                        )
            self.data[name] = (body, hashlib.sha256(body).hexdigest()[:20])
        return self.data[name]

    def version(self, name: str) -> str:
        return self.get(name)[1]


_files = _Files()


def _security_headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CONSOLE_CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


@router.get("/", include_in_schema=False)
async def root():
    return RedirectResponse("/console", status_code=307)


@router.get("/console", include_in_schema=False)
@router.get("/console/{name}", include_in_schema=False)
async def console_file(request: Request, name: str = "index.html"):
    found = _files.get(name)
    if found is None:
        raise HTTPException(404, f"no console file {name!r}")
    body, digest = found
    etag = f'"{digest}"'
    immutable = name != "index.html" and request.query_params.get("v") == digest
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return _security_headers(Response(status_code=304, headers=headers))
    return _security_headers(Response(body, media_type=CONSOLE_FILES[name], headers=headers))


def feed_of(request: Request) -> FleetFeed:
    state = request.app.state
    feed = getattr(state, "feed", None)
    if feed is None:
        services = state.services
        feed = state.feed = FleetFeed(services.registry, services.config.console.feed_interval)
    return feed


@router.get(EVENTS_PATH, tags=["console"])
async def events(
    request: Request,
    services: Services,
    _who: Caller,
    rack: str | None = Query(None, description="also stream this Rack's detail (`rack` events)"),
    logs: bool = Query(False, description="also stream the log tail (`logs` events)"),
    log_rack: str | None = None,
    min_level: str | None = None,
    q: str | None = None,
    since: str | None = Query(None, description="the tail starts this far back (default 15m)"),
):
    """Server-sent events: `fleet` (all Racks), `racks` (changes), `rack`, `logs`, `error`."""
    feed = feed_of(request)
    if feed.subscribers >= MAX_STREAMS:
        raise HTTPException(
            503, f"{MAX_STREAMS} event streams are open already; close a console tab", headers={"Retry-After": "10"}
        )
    interval = services.config.console.feed_interval
    extra = None
    if rack:
        row = services.registry.get(rack, include_removed=True)  # 404 before the stream starts
        extra = rack_stream(services.registry, row.rack_id, interval, feed.closed)
    elif logs:
        filters = {"rack": log_rack or None, "min_level": min_level or None, "q": q or None, "since": since}
        services.queries.logs(since=since or "15m", limit=1, **{k: v for k, v in filters.items() if k != "since"})
        extra = log_stream(services.queries, filters, interval, feed.closed)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(feed.stream(extra), media_type="text/event-stream", headers=headers)


def _ports(gear: dict) -> tuple[list[str], list[str]]:
    try:
        from fluxrig.runtime.registry import get_gear_class

        ins, outs = get_gear_class(str(gear.get("type")).strip()).MANIFEST.ports(gear.get("config") or {})
        return list(ins), list(outs)
    except Exception:  # an unknown type is drawn from its wires alone
        return [], []


def _endpoint(text: str) -> tuple[str | None, str, str]:
    parts = str(text).split(".")
    if len(parts) >= 3:
        return parts[0], parts[1], ".".join(parts[2:])
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, str(text), ""


@router.get("/api/v1/console/racks/{rack}/graph", tags=["console"])
async def rack_graph(services: Services, _who: Caller, rack: str):
    """The Rack's projection of the active scenario as a graph, with each gear's counters."""
    row = services.registry.get(rack, include_removed=True)
    active = services.scenarios.active()
    stats = row.stats or {}
    gear_stats = stats.get("gears") or {}
    stopped = set((stats.get("ctrl") or {}).get("stopped_gears") or [])
    out = {
        "rack": row.name,
        "scenario": active.summary() if active else None,
        "applied": row.scenario_version,
        "gears": [],
        "wires": [],
        "remote": [],
    }
    if active is None:
        return out
    proj = project(active.doc, row.name, row.labels)
    gears = {}
    for g in proj.get("gears") or []:
        ins, outs = _ports(g)
        gears[g["name"]] = {
            "name": g["name"],
            "type": g.get("type"),
            "doc": g.get("doc") or "",
            "inputs": ins,
            "outputs": outs,
            "stats": gear_stats.get(g["name"]),
            "stopped": g["name"] in stopped,
        }

    def port(gear: str, name: str, side: str) -> None:
        g = gears.get(gear)
        if g is not None and name and name not in g[side]:
            g[side].append(name)

    for w in proj.get("wires") or []:
        _, fg, fp = _endpoint(w.get("from", ""))
        _, tg, tp = _endpoint(w.get("to", ""))
        port(fg, fp, "outputs")
        port(tg, tp, "inputs")
        out["wires"].append({"from": fg, "from_port": fp, "to": tg, "to_port": tp})
    for w in proj.get("x-remote-wires") or []:
        fr, fg, fp = _endpoint(w.get("from", ""))
        tr, tg, tp = _endpoint(w.get("to", ""))
        if w.get("direction") == "out":
            port(fg, fp, "outputs")
            local, lport, peer = fg, fp, f"{tr + '.' if tr else ''}{tg}.{tp}"
        else:
            port(tg, tp, "inputs")
            local, lport, peer = tg, tp, f"{fr + '.' if fr else ''}{fg}.{fp}"
        out["remote"].append(
            {
                "gear": local,
                "port": lport,
                "direction": w.get("direction"),
                "peer": peer,
                "lane": w.get("lane"),
                "subject": w.get("subject"),
            }
        )
    out["gears"] = list(gears.values())
    return out


def _gear_of(attributes) -> str:
    if isinstance(attributes, str):
        try:
            attributes = json.loads(attributes or "{}")
        except ValueError:
            return ""
    return str((attributes or {}).get("gear") or "") if isinstance(attributes, dict) else ""


def _bucket_start(ts: str, seconds: float) -> float:
    t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return t - (t % seconds)


@router.get("/api/v1/console/series", tags=["console"])
def series(
    services: Services,
    _who: Caller,
    rack: str = Query(..., description="the Rack"),
    gear: str | None = Query(None, description="one gear; none = the Rack's gears summed"),
    name: str | None = Query(None, description="any other metric: its average per bucket instead of rates"),
    since: str = "1h",
    until: str | None = None,
    bucket: str = "1m",
):
    """Per time bucket: rates (per second) of messages in/out and errors computed from the gear
    counters (a counter that went down, a Rack restart, counts from zero), or `name`'s average.
    Runs in the thread pool (plain def): the query never holds the event loop."""
    try:
        step = parse_duration(bucket)
    except ValueError as exc:
        raise HTTPException(400, f"bucket: {exc}")
    if step < 1:
        raise HTTPException(400, "bucket: at least 1s")
    q = services.queries
    if name:
        rows = q.metrics(name=name, rack=rack, since=since, until=until, limit=_SERIES_ROWS)
        sums: dict[float, list[float]] = {}
        for r in rows:
            if gear and _gear_of(r.get("attributes")) != gear:
                continue
            b = _bucket_start(r["timestamp"], step)
            acc = sums.setdefault(b, [0.0, 0])
            acc[0] += float(r["value"] or 0)
            acc[1] += 1
        points = [{"t": b, name: s / n} for b, (s, n) in sorted(sums.items())][-MAX_SERIES_POINTS:]
        return {"rack": rack, "gear": gear, "bucket_s": step, "series": [name], "points": points}
    # Counters: the last value per (gear, bucket), then the increase per bucket, summed over gears.
    per: dict[str, dict[float, float]] = {}
    truncated = False
    for metric in SERIES_COUNTERS:
        rows = q.metrics(name=metric, rack=rack, since=since, until=until, limit=_SERIES_ROWS)
        truncated |= len(rows) >= _SERIES_ROWS
        last: dict[tuple[str, float], tuple[str, float]] = {}
        for r in rows:  # newest first
            g = _gear_of(r.get("attributes"))
            if gear and g != gear:
                continue
            key = (g, _bucket_start(r["timestamp"], step))
            if key not in last:
                last[key] = (r["timestamp"], float(r["value"] or 0))
        by_gear: dict[str, list[tuple[float, float]]] = {}
        for (g, b), (_, v) in last.items():
            by_gear.setdefault(g, []).append((b, v))
        out: dict[float, float] = {}
        for pts in by_gear.values():
            pts.sort()
            for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
                inc = v1 - v0 if v1 >= v0 else v1
                out[b1] = out.get(b1, 0.0) + inc / max(step, b1 - b0)
        per[metric.rsplit(".", 1)[1]] = out
    stamps = sorted({b for m in per.values() for b in m})[-MAX_SERIES_POINTS:]
    points = [{"t": b, **{k: round(v.get(b, 0.0), 3) for k, v in per.items()}} for b in stamps]
    return {
        "rack": rack,
        "gear": gear,
        "bucket_s": step,
        "series": list(per),
        "points": points,
        "truncated": truncated,
    }


_STEP = re.compile(r"([^.\[\]()]+)|\[(\d+)\]|\(([^)]*)\)")
_AT_LINE = re.compile(r"^<[^>]*>:(\d+)(?::(\d+))?")


def locate(text: str, fmt: str, location: str) -> int | None:
    """The 1-based line a validator location names (`gears[0](gateway).config.bind`,
    `<scenario>:2:1`, or a Rack-prefixed `edge-1: wires[3].to`), or None."""
    m = _AT_LINE.match(location)
    if m:
        return int(m.group(1))
    if ": " in location:
        location = location.split(": ", 1)[1]
    steps = [(a or None, int(b) if b else None) for a, b, _c in _STEP.findall(location) if a or b]
    if fmt == "yaml":
        import yaml

        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return None
        line = None
        for key, index in steps:
            if isinstance(node, yaml.MappingNode) and key is not None:
                nxt = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
                if nxt is None:
                    break
                line = next(k for k, v in node.value if v is nxt).start_mark.line + 1
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and index is not None and index < len(node.value):
                node = node.value[index]
                line = node.start_mark.line + 1
            else:
                break
        return line
    keys = [k for k, _ in steps if k]
    if not keys:
        return None
    pat = re.compile(rf"^\s*\"?{re.escape(keys[-1])}\"?\s*=")
    for i, ln in enumerate(text.splitlines(), 1):
        if pat.match(ln):
            return i
    return None


@router.post("/api/v1/console/check", tags=["console"])
async def check_scenario(request: Request, services: Services, _who: Caller, format: str = "yaml"):
    """Validate a scenario text (the body) without storing it: every problem with its line."""
    if format not in ("yaml", "toml"):
        raise HTTPException(400, "format: yaml or toml")
    body = await request.body()
    if len(body) > min(MAX_CHECK_BYTES, services.config.api.max_import_bytes):
        raise HTTPException(413, "scenario too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "scenario must be UTF-8 text")
    store = services.scenarios
    try:
        doc = store.check(text, format)
    except ScenarioError as exc:
        problems = [
            {"location": p.location, "message": p.message, "line": locate(text, format, p.location)}
            for p in exc.problems
        ]
        return {"valid": False, "problems": problems, "warnings": []}
    racks = [(r.name, r.labels) for r in services.registry.list()]
    warnings = [
        {"location": p.location, "message": p.message, "line": locate(text, format, p.location)}
        for p in store.projection_problems(doc, racks)
    ]
    meta = doc.get("meta") or {}
    return {
        "valid": True,
        "name": meta.get("name"),
        "version": str(meta.get("version")),
        "problems": [],
        "warnings": warnings,
    }
