"""Routes: the Mixer itself: health (the one route without a token), topology, Prometheus metrics.

GET /api/v1/health is liveness for load balancers and systemd checks: it names the Mixer,
its version and uptime, and whether the Snake runs. /api/v1/topology and /metrics need the
bearer token (Prometheus scrapes with `authorization: {credentials: ...}`).
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from fluxrig.wire.vocab import TRAFFIC_STATUSES, TelemetryKind

from .._version import __version__
from ..scenarios import project
from ..states import STATUSES
from .feed import storage_failed
from .services import GUARDED, MixerServices, Services

__all__ = [
    "router",
    "prometheus_text",
    "PROMETHEUS_CONTENT_TYPE",
    "TELEMETRY_KINDS",
    "PLACED_STATUSES",
    "health",
    "topology",
    "metrics",
]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"
TELEMETRY_KINDS = tuple(TelemetryKind)
# Statuses whose Racks are shown with the gears the active scenario places on them.
PLACED_STATUSES = tuple(TRAFFIC_STATUSES)

router = APIRouter(tags=["mixer"])


@router.get("/api/v1/health")
async def health(services: Services):
    """Liveness; the only route without a token."""
    snake = services.snake
    return {
        "status": "ok",
        "version": __version__,
        "name": services.config.base.name,
        "uptime_s": round(time.time() - services.started_at, 1),
        "snake": {"running": bool(snake.running), "restarts": snake.restarts},
    }


@router.get("/api/v1/topology", dependencies=GUARDED)
async def topology(services: Services):
    active = services.scenarios.active()
    racks = []
    for r in services.registry.list():
        public = r.public()
        entry = {
            "id": r.rack_id,
            "name": r.name,
            "status": r.status,
            "last_seen": public["last_seen"],
            "scenario": public["scenario"],
            "gears": [],
            "remote_wires": [],
        }
        if active is not None and r.status in PLACED_STATUSES:
            proj = project(active.doc, r.name, r.labels)
            entry["gears"] = [g["name"] for g in proj["gears"]]
            entry["remote_wires"] = proj.get("x-remote-wires", [])
        racks.append(entry)
    snake = services.snake
    return JSONResponse(
        {
            "mixer": {"name": services.config.base.name, "version": __version__, "public_key": services.public_key_hex},
            "snake": {"url": snake.url, "running": snake.running, "restarts": snake.restarts},
            "active_scenario": active.summary() if active else None,
            "racks": racks,
        }
    )


@router.get("/metrics", dependencies=GUARDED, response_class=PlainTextResponse)
async def metrics(services: Services):
    return PlainTextResponse(prometheus_text(services), media_type=PROMETHEUS_CONTENT_TYPE)


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"')


def prometheus_text(services: MixerServices) -> str:
    """The Prometheus text exposition of the Mixer's counters and gauges."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    registry = services.registry
    counts = registry.counts()
    metric("fluxrig_mixer_racks", "gauge", "Racks by status", [({"status": s}, counts.get(s, 0)) for s in STATUSES])
    apply_counts: dict[str, int] = {}
    storage_counts = {"telemetry": 0, "lanes": 0}
    for r in registry.list():
        apply_counts[r.apply_state] = apply_counts.get(r.apply_state, 0) + 1
        for wal in storage_failed(r.stats):
            if wal in storage_counts:
                storage_counts[wal] += 1
    metric(
        "fluxrig_mixer_rack_scenario_apply",
        "gauge",
        "Racks by scenario apply state",
        [({"state": s}, n) for s, n in sorted(apply_counts.items())],
    )
    metric(
        "fluxrig_mixer_racks_storage_failed",
        "gauge",
        "Racks whose WAL refuses writes (a full disk) by their last heartbeat; it heals when space returns",
        [({"wal": w}, n) for w, n in storage_counts.items()],
    )
    c = services.controller.counters
    metric(
        "fluxrig_mixer_hello_total",
        "counter",
        "Hello requests by outcome",
        [
            ({"result": "ok"}, c["hello_ok"]),
            ({"result": "denied"}, c["hello_denied"]),
            ({"result": "malformed"}, c["hello_bad"]),
        ],
    )
    metric("fluxrig_mixer_heartbeats_total", "counter", "Heartbeats received", [({}, c["heartbeats"])])
    metric(
        "fluxrig_mixer_dropped_total",
        "counter",
        "Hellos and heartbeats dropped before any work: over their sender's rate, or too large",
        [({"what": what}, n) for what, n in sorted(services.controller.dropped().items())],
    )
    snake = services.snake
    metric(
        "fluxrig_mixer_snake_up", "gauge", "1 when nats-server accepts connections", [({}, 1 if snake.running else 0)]
    )
    metric(
        "fluxrig_mixer_snake_restarts_total", "counter", "nats-server restarts after it died", [({}, snake.restarts)]
    )
    metric(
        "fluxrig_mixer_snake_reloads_total",
        "counter",
        "nats-server config reloads (users changed)",
        [({}, snake.reloads)],
    )
    st = services.ingest.stats
    metric(
        "fluxrig_mixer_telemetry_rows_total",
        "counter",
        "Telemetry rows stored",
        [({"kind": k}, st["rows"].get(k, 0)) for k in TELEMETRY_KINDS],
    )
    metric(
        "fluxrig_mixer_telemetry_duplicates_total",
        "counter",
        "Telemetry rows dropped as re-sends",
        [({"kind": k}, st["duplicates"].get(k, 0)) for k in TELEMETRY_KINDS],
    )
    metric(
        "fluxrig_mixer_telemetry_messages_total", "counter", "Telemetry bus messages consumed", [({}, st["messages"])]
    )
    metric(
        "fluxrig_mixer_telemetry_rejected_batches_total",
        "counter",
        "Telemetry batches that could not be stored",
        [({}, st["rejected_batches"])],
    )
    # -- archive: the telemetry store's state while it cannot write (ingest.py) --
    metric(
        "fluxrig_mixer_telemetry_store_up",
        "gauge",
        "1 while the telemetry store takes writes; 0 during an outage (nothing is acked meanwhile)",
        [({}, 1 if st.get("store_up", True) else 0)],
    )
    metric(
        "fluxrig_mixer_telemetry_store_outages_total",
        "counter",
        "Times the telemetry store stopped taking writes",
        [({}, st.get("outages", 0))],
    )
    metric(
        "fluxrig_mixer_telemetry_store_outage_seconds_total",
        "counter",
        "Seconds the telemetry store could not write",
        [({}, st.get("outage_seconds", 0.0))],
    )
    metric(
        "fluxrig_mixer_telemetry_backlog_messages",
        "gauge",
        "Telemetry bus messages waiting in JetStream for the ingest (last known)",
        [({}, st.get("backlog", 0))],
    )
    metric(
        "fluxrig_mixer_telemetry_quota_deferred_total",
        "counter",
        "Telemetry messages left in JetStream (NAKed until the window ends) because their Rack was over its quota",
        [({"rack": r}, n) for r, n in sorted(st.get("quota_deferred", {}).items())] or [({}, 0)],
    )
    metric(
        "fluxrig_mixer_telemetry_quota_deferred_rows_total",
        "counter",
        "Telemetry rows deferred by a Rack's quota (a row deferred twice counts twice)",
        [({"rack": r}, n) for r, n in sorted(st.get("quota_deferred_rows", {}).items())] or [({}, 0)],
    )
    metric(
        "fluxrig_mixer_telemetry_quota_used_ratio",
        "gauge",
        "Share of its telemetry quota a Rack used in its window, for Racks at 80 % or over (1 = deferred)",
        [({"rack": r, "state": st.get("quota_state", {}).get(r, "")}, v)
         for r, v in sorted(st.get("quota_used", {}).items())] or [({}, 0)],
    )  # fmt: skip
    metric(
        "fluxrig_mixer_telemetry_quota_yielding",
        "gauge",
        "1 while flux-telemetry is half full and telemetry quotas defer nothing (a Rack over its quota must "
        "not fill the stream for the others)",
        [({}, 1 if st.get("quota_yielding") else 0)],
    )
    metric(
        "fluxrig_mixer_telemetry_incarnations_refused_total",
        "counter",
        "Telemetry messages dropped because their Rack opened more WALs than telemetry.max_incarnations",
        [({"rack": r}, n) for r, n in sorted(st.get("incarnations_refused", {}).items())] or [({}, 0)],
    )
    metric(
        "fluxrig_mixer_uptime_seconds",
        "gauge",
        "Seconds since the Mixer started",
        [({}, round(time.time() - services.started_at, 3))],
    )
    return "\n".join(lines) + "\n"
