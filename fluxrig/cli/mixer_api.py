"""A small client for the Mixer control API, stdlib only (urllib), for the operator commands.

The Rack must not depend on an HTTP framework, so this is urllib plus json. Where to call:
`--api-url` or `FLUXRIG_API_URL` (default http://127.0.0.1:8090); the bearer token:
`--api-token`, `FLUXRIG_API_TOKEN`, or a file named by `--api-token-file` /
`FLUXRIG_API_TOKEN_FILE` (e.g. the Mixer's `data/api-token`). Failures raise MixerApiError
with the HTTP status and the Mixer's own error text; `run_api_command` turns that into an
exit code (1 = request refused, 3 = Mixer unreachable) and a one-line message.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from ..errors import MixerApiError

__all__ = ["MixerClient", "add_api_args", "client_from_args", "print_table", "run_api_command", "DEFAULT_API_URL"]

DEFAULT_API_URL = "http://127.0.0.1:8090"
DEFAULT_TIMEOUT_S = 15.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class MixerClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, params: dict | None = None, body=None, content_type: str | None = None):
        query = {k: v for k, v in (params or {}).items() if v not in (None, "", False)}
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            if isinstance(body, (bytes, str)):
                data = body.encode() if isinstance(body, str) else body
                headers["Content-Type"] = content_type or "application/yaml"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES)
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw = exc.read(65536)
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = {"error": raw.decode("utf-8", "replace").strip() or exc.reason}
            message = detail.get("error") if isinstance(detail, dict) else str(detail)
            if exc.code == 401:
                message = f"{message} (set --api-token or FLUXRIG_API_TOKEN; the Mixer keeps it in data/api-token)"
            err = MixerApiError(f"{method} {path}: HTTP {exc.code}: {message}", exc.code, url)
            err.detail = detail
            raise err from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MixerApiError(f"cannot reach the Mixer at {self.url}: {reason}", 0, url) from None
        if "json" in ctype:
            return json.loads(raw)
        return raw.decode("utf-8", "replace")

    def get(self, path, **params):
        return self.request("GET", path, params)

    def post(self, path, body=None, params=None, content_type=None):
        return self.request("POST", path, params, body if body is not None else {}, content_type)

    def delete(self, path):
        return self.request("DELETE", path)


def add_api_args(parser) -> None:
    g = parser.add_argument_group("Mixer API")
    g.add_argument("--api-url", help=f"Mixer API base URL (env FLUXRIG_API_URL, default {DEFAULT_API_URL})")
    g.add_argument("--api-token", help="bearer token (env FLUXRIG_API_TOKEN)")
    g.add_argument("--api-token-file", help="read the token from this file, e.g. the Mixer's data/api-token "
                                            "(env FLUXRIG_API_TOKEN_FILE)")
    g.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def client_from_args(args) -> MixerClient:
    url = getattr(args, "api_url", None) or os.environ.get("FLUXRIG_API_URL") or DEFAULT_API_URL
    token = getattr(args, "api_token", None) or os.environ.get("FLUXRIG_API_TOKEN")
    token_file = getattr(args, "api_token_file", None) or os.environ.get("FLUXRIG_API_TOKEN_FILE")
    if not token and token_file:
        try:
            with open(token_file) as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise MixerApiError(f"cannot read the API token file {token_file}: {exc.strerror}", 0, url) from None
    return MixerClient(url, token)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str]], out=None, max_width: int = 60) -> None:
    """Columns are (header, key) where key may be dotted ("scenario.version")."""
    out = out or sys.stdout

    def pick(row, key):
        for part in key.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        return row

    cells = [[_cell(pick(r, k))[:max_width] for _h, k in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _k) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (h, _k), w in zip(columns, widths)).rstrip(), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip(), file=out)
    if not rows:
        print("(none)", file=out)


def run_api_command(fn, args) -> int:
    """Call fn(client, args) -> int, mapping MixerApiError to a message and an exit code."""
    try:
        return int(fn(client_from_args(args), args) or 0)
    except MixerApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if exc.status == 0 else 1
