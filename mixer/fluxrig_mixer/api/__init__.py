"""The Mixer's control API (FastAPI): `create_app(services)` over a typed `MixerServices`.

Auth: `Authorization: Bearer <token>` on every route except `GET /api/v1/health`, compared in
constant time; a missing or wrong token gets 401. That includes /docs, /openapi.json and
/metrics (Prometheus scrapes with `authorization: {credentials: ...}`). With
`api.auth_disabled_dangerously = true` and no token every route is open.

Layout: application.py builds the app and maps errors to statuses; services.py declares what
the routes may use and the auth dependency; routes_racks, routes_commands (kill switch),
routes_scenarios, routes_telemetry and routes_health (health, topology, /metrics) hold one
router each.
"""

from .application import create_app
from .services import MixerServices

__all__ = ["create_app", "MixerServices"]
