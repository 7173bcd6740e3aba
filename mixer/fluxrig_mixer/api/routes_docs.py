"""Routes: the API's interactive documentation at /docs, with no CDN (air-gapped sites).

Job. Serve Swagger UI for /openapi.json from files that ship with the Mixer's own
dependencies, so /docs works with no internet at all:

  GET /docs                   the page (credentials needed: a bearer token or a console
                              session; a browser logged in to /console opens it as it is)
  GET /docs/static/<file>     Swagger UI's script, style sheet and icon, from the
                              `fastapi-offline` package (Swagger UI 5, Apache-2.0; its
                              licence travels with the package), and docs.js, the page's
                              start-up script (fluxrig_mixer/console/docs.js). No
                              credentials: library code, no data.

Contract. Nothing the page loads comes from another origin: a Content-Security-Policy limits
scripts, styles, images and requests to this Mixer ('unsafe-inline' styles only: Swagger UI
sets style attributes). The start-up script is a file, not an inline block, so scripts stay
'self' only. For a console session it reads the session's CSRF token once and adds it to
every state-changing call made with "Try it out" (the same rule as the console's own calls,
api/auth.py); a bearer token entered with "Authorize" needs none.

Files are read once and served with an ETag; the page names them with `?v=<digest>` so they
may be cached for good (a new Swagger UI changes the digest, hence the URL).
"""

from __future__ import annotations

import hashlib
import html
import importlib.resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from .services import GUARDED

__all__ = ["router", "DOCS_FILES", "DOCS_CSP", "DOCS_PATH", "STATIC_PREFIX", "docs_page", "docs_file", "docs_html"]

DOCS_PATH = "/docs"
STATIC_PREFIX = "/docs/static/"
# name -> (package, path inside it, content type); nothing else is served.
DOCS_FILES = {
    "swagger-ui-bundle.js": ("fastapi_offline", "static/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("fastapi_offline", "static/swagger-ui.css", "text/css; charset=utf-8"),
    "favicon.png": ("fastapi_offline", "static/favicon.png", "image/png"),
    "docs.js": ("fluxrig_mixer", "console/docs.js", "text/javascript; charset=utf-8"),
}
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter()


class _Files:
    """The documentation's files, read once from their packages (works frozen too)."""

    def __init__(self):
        self.data: dict[str, tuple[bytes, str]] = {}

    def get(self, name: str) -> tuple[bytes, str] | None:
        if name not in DOCS_FILES:
            return None
        if name not in self.data:
            package, path, _ = DOCS_FILES[name]
            try:
                body = importlib.resources.files(package).joinpath(path).read_bytes()
            except (ModuleNotFoundError, FileNotFoundError) as exc:
                raise HTTPException(
                    500,
                    f"/docs asset {name} is missing ({package}: {exc}); reinstall fluxrig-mixer with its dependencies",
                ) from None
            self.data[name] = (body, hashlib.sha256(body).hexdigest()[:20])
        return self.data[name]

    def url(self, name: str) -> str:
        return f"{STATIC_PREFIX}{name}?v={self.get(name)[1]}"


_files = _Files()


def _secured(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = DOCS_CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


def docs_html(title: str, openapi_url: str = "/openapi.json") -> str:
    """The /docs page: Swagger UI's assets from this Mixer, the start-up script as a file."""
    t = html.escape(title)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{t}</title>
<link rel="icon" type="image/png" href="{_files.url("favicon.png")}">
<link rel="stylesheet" href="{_files.url("swagger-ui.css")}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{html.escape(openapi_url)}"></div>
<script src="{_files.url("swagger-ui-bundle.js")}"></script>
<script src="{_files.url("docs.js")}"></script>
</body>
</html>
"""


@router.get(DOCS_PATH, include_in_schema=False, dependencies=GUARDED)
async def docs_page(request: Request):
    return _secured(HTMLResponse(docs_html(request.app.title), headers={"Cache-Control": "no-cache"}))


@router.get(STATIC_PREFIX + "{name}", include_in_schema=False)
async def docs_file(request: Request, name: str):
    found = _files.get(name)
    if found is None:
        raise HTTPException(404, f"no documentation file {name!r}")
    body, digest = found
    etag = f'"{digest}"'
    immutable = request.query_params.get("v") == digest
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return _secured(Response(status_code=304, headers=headers))
    return _secured(Response(body, media_type=DOCS_FILES[name][2], headers=headers))
