"""A small client for the Mixer control API, stdlib only (urllib), for the operator commands.

The Rack must not depend on an HTTP framework, so this is urllib plus json. Where to call:
`--api-url` or `FLUXRIG_API_URL` (default http://127.0.0.1:8090), one URL or a comma list (the
nodes of a Mixer cluster: see "Several API URLs" below); the bearer token:
`--api-token`, `FLUXRIG_API_TOKEN`, or a file named by `--api-token-file` /
`FLUXRIG_API_TOKEN_FILE` (e.g. the Mixer's `data/api-token`; the file keeps the token out of
`ps`); an HTTPS API is verified against `--api-ca-file` / `FLUXRIG_API_CA_FILE`. Failures raise MixerApiError
with the HTTP status and the Mixer's own error text; `run_api_command` turns that into an
exit code (1 = request refused, 3 = Mixer unreachable) and a one-line message.

Several API URLs (issue 14: every node of a cluster answers every call). The client starts with
the URL that answered last (the first at start) and moves to the next one when a node does not
answer: the connection could not be made (refused, unreachable, TLS handshake, connect
timeout: nothing was sent, so any method may go elsewhere), or the node answered 503 (it could
not act: a node still joining, a bus it cannot reach). A node that accepted the request and
then timed out may have acted on it: a GET goes to the next node, anything else is reported
as it is (no change is sent twice). MixerApiError names every URL tried when none answered.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from ..errors import MixerApiError
from ..textsafe import SafeStream, escape_text

__all__ = ["MixerClient", "add_api_args", "client_from_args", "print_table", "run_api_command", "DEFAULT_API_URL"]

DEFAULT_API_URL = "http://127.0.0.1:8090"
DEFAULT_TIMEOUT_S = 15.0
MAX_API_URLS = 16
# Answers that mean "this node cannot act now, another may": tried on the next URL.
RETRY_ELSEWHERE_STATUSES = frozenset({503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class MixerClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, ca_file: str = ""):
        """`url`: one base URL or a comma list of them (a cluster's nodes, tried in turn)."""
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()][:MAX_API_URLS]
        if not self.urls:
            raise MixerApiError("no Mixer API URL given (--api-url)", 0, url)
        self.url = self.urls[0]  # the one that answered last
        self.token = token
        self.timeout = timeout
        # HTTPS against the Mixer's generated CA (api.tls): verified, never skipped.
        self._ssl = None
        if ca_file:
            import ssl

            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise MixerApiError(f"cannot use the API CA file {ca_file}: {exc}", 0, url) from None

    def request(self, method: str, path: str, params: dict | None = None, body=None, content_type: str | None = None):
        """The decoded answer of the first node that answers (see the module docstring)."""
        start = self.urls.index(self.url)
        order = self.urls[start:] + self.urls[:start]
        failures = []
        for base in order:
            try:
                result = self._request_one(base, method, path, params, body, content_type)
            except _TryElsewhere as exc:
                failures.append(f"{base}: {exc.reason}")
                continue
            self.url = base
            return result
        where = "; ".join(failures)
        raise MixerApiError(f"cannot reach the Mixer ({where})", 0, order[0]) from None

    def _request_one(self, base, method, path, params, body, content_type):
        query = {k: v for k, v in (params or {}).items() if v not in (None, "", False)}
        url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
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
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES)
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            if exc.code in RETRY_ELSEWHERE_STATUSES and len(self.urls) > 1:
                raise _TryElsewhere(f"HTTP {exc.code}") from None
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
        except urllib.error.URLError as exc:  # raised before the request was sent: safe anywhere
            raise _TryElsewhere(str(getattr(exc, "reason", exc))) from None
        except OSError as exc:  # sent, then no answer: the node may have acted
            if method in IDEMPOTENT_METHODS:
                raise _TryElsewhere(f"no answer ({exc})") from None
            raise MixerApiError(
                f"{method} {path}: {base} accepted the request and did not answer ({exc}); it may have been "
                "applied: check before sending it again",
                0,
                url,
            ) from None
        if "json" in ctype:
            return json.loads(raw)
        return raw.decode("utf-8", "replace")

    def get(self, path, **params):
        return self.request("GET", path, params)

    def post(self, path, body=None, params=None, content_type=None):
        return self.request("POST", path, params, body if body is not None else {}, content_type)

    def delete(self, path):
        return self.request("DELETE", path)


class _TryElsewhere(Exception):
    """Internal: this node did not answer; the next URL may."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def add_api_args(parser) -> None:
    g = parser.add_argument_group("Mixer API")
    g.add_argument(
        "--api-url",
        help=f"Mixer API base URL, or a comma list of a cluster's nodes tried in turn when one does not answer "
        f"(env FLUXRIG_API_URL, default {DEFAULT_API_URL})",
    )
    g.add_argument(
        "--api-token",
        help="bearer token (env FLUXRIG_API_TOKEN); visible in `ps`: prefer --api-token-file; "
        "a token beginning with '-' is given as --api-token=TOKEN",
    )
    g.add_argument(
        "--api-token-file",
        help="read the token from this file, e.g. the Mixer's data/api-token (env FLUXRIG_API_TOKEN_FILE)",
    )
    g.add_argument(
        "--api-ca-file",
        help="CA to verify an HTTPS API with, e.g. the Mixer's data/certs/ca.pem (env FLUXRIG_API_CA_FILE)",
    )
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
    ca_file = getattr(args, "api_ca_file", None) or os.environ.get("FLUXRIG_API_CA_FILE") or ""
    return MixerClient(url, token, ca_file=ca_file)


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

    # Escaped first (a newline or ESC from a Rack stays visible and on its line), then cut.
    cells = [[escape_text(_cell(pick(r, k)))[:max_width] for _h, k in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _k) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (h, _k), w in zip(columns, widths)).rstrip(), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip(), file=out)
    if not rows:
        print("(none)", file=out)


def run_api_command(fn, args) -> int:
    """Call fn(client, args) -> int, mapping MixerApiError to a message and an exit code.

    What the command prints passes through SafeStream: text the Mixer relays from Racks (log
    bodies, reasons, names) cannot put a control character on the operator's terminal."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(out), SafeStream(err)
    try:
        return int(fn(client_from_args(args), args) or 0)
    except MixerApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if exc.status == 0 else 1
    finally:
        sys.stdout, sys.stderr = out, err
