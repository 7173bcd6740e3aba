"""Operator identity for the control API: named API tokens with roles, console sessions, CSRF, audit.

Job. Say who is calling. One plain function, `Authenticator.authenticate(headers, method)`
(and `authenticate_scope(scope)` for an ASGI middleware), answers a `Principal` (token name,
role, how it was presented) or None; the FastAPI dependencies in services.py and the request
guard (api/guard.py) both call it, so credentials are checked before any request body is read.

Credentials.
  - `Authorization: Bearer <token>`: a named API token. Tokens are random (TOKEN_BYTES of
    entropy), shown once when created, and stored only as their SHA-256 digest in the
    `api_tokens` table of mixer.duckdb (a slow KDF buys nothing for 256-bit random secrets;
    a leaked table gives no usable token). On a Mixer with a bus that table is a cache of the
    cluster's shared bucket (shared_identity.py): `Authenticator.create_token`/`revoke_token`. The first-start token (`<state_dir>/api-token`, or
    api.auth_token) is the admin token named INITIAL_TOKEN_NAME, held as a digest in memory.
  - the console session cookie (SESSION_COOKIE, HttpOnly, SameSite=Strict, Path=/, Secure
    when the API serves HTTPS) made by a login with a token. The session is the cookie,
    signed with a key derived from the cluster key (api/sessions.py): it survives a Mixer
    restart and any Mixer of the cluster accepts it; it expires after `console.session_ttl`
    and after `console.session_idle` without a request, and ends with its token (revoked or
    expired: checked on every request) or a logout. A state-changing request (any method but
    GET/HEAD/OPTIONS) made with the cookie must carry the session's CSRF token in the
    CSRF_HEADER header, and an Origin header, when present, must name this host; a bearer
    token needs neither (a browser never adds it by itself).

Roles, from least to most: `read` (GET only), `operate` (every state-changing call on Racks,
scenarios and the kill switch), `admin` (operate, plus creating and revoking API tokens).
A request whose method changes state needs `operate` at least.

Audit. `AuditMiddleware` writes one `api_audit` row per state-changing request, refused ones
included: when, token name and role (or none), how (bearer or session), method, path,
status, client address. A request refused for want of credentials (401), here or at the front
door (guard.py: also 413, 408, 503 before any route runs), goes through `RefusalAudit`: at most
one row per client address and status every REFUSAL_AUDIT_WINDOW_S, the rest counted and
summed up in a WARNING, so that a stranger's flood cannot turn into a flood of writes.
Each row has an id and the name of the node that served the call; on a Mixer with a bus the
rows are shared with every node of the cluster (shared_audit.py), so each node lists them all.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fluxrig.errors import FluxError
from fluxrig.ids import uuid7_str

from .sessions import DEFAULT_SESSION_IDLE_S, DEFAULT_SESSION_TTL_S, Session, SessionStore

__all__ = [
    "Principal",
    "TokenRecord",
    "TokenStore",
    "Session",
    "SessionStore",
    "Authenticator",
    "AuditLog",
    "AuditMiddleware",
    "RefusalAudit",
    "REFUSAL_AUDIT_WINDOW_S",
    "REFUSAL_AUDIT_CLIENTS",
    "authenticate_scope",
    "AuthError",
    "TokenNameTaken",
    "TokenNotFound",
    "ROLES",
    "ROLE_READ",
    "ROLE_OPERATE",
    "ROLE_ADMIN",
    "SAFE_METHODS",
    "SESSION_COOKIE",
    "CSRF_HEADER",
    "INITIAL_TOKEN_NAME",
    "TOKEN_BYTES",
    "TOKEN_PREFIX",
    "TOKEN_NAME_RE",
    "MAX_TOKENS",
    "MAX_SESSIONS",
    "DEFAULT_SESSION_TTL_S",
    "DEFAULT_SESSION_IDLE_S",
    "AUDIT_SHOWN",
    "AUDIT_COLUMNS",
    "AUDIT_PATH_CHARS",
    "hash_token",
    "ensure_tables",
]

log = logging.getLogger("fluxrig.mixer.auth")

ROLE_READ = "read"
ROLE_OPERATE = "operate"
ROLE_ADMIN = "admin"
ROLES = (ROLE_READ, ROLE_OPERATE, ROLE_ADMIN)  # ordered: each includes the ones before
_RANK = {r: i for i, r in enumerate(ROLES)}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SESSION_COOKIE = "fluxrig_session"
CSRF_HEADER = "x-csrf-token"
INITIAL_TOKEN_NAME = "initial-admin"
TOKEN_BYTES = 32
TOKEN_PREFIX = "frx_"  # recognisable in a leak scanner; not a secret
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_TOKENS = 1000
MAX_SESSIONS = 1000  # console.max_sessions' default; sessions are signed cookies now (not held)
AUDIT_SHOWN = 200
AUDIT_PATH_CHARS = 512  # an audit row's path is cut here (a URL can be longer than anyone reads)
AUDIT_METHOD_CHARS = 16
AUDIT_CLIENT_CHARS = 64  # "address:port", IPv6 included

_TABLES = [
    """CREATE TABLE IF NOT EXISTS api_tokens(
           name VARCHAR PRIMARY KEY, role VARCHAR NOT NULL, digest VARCHAR NOT NULL,
           created_at DOUBLE NOT NULL, expires_at DOUBLE, revoked_at DOUBLE, created_by VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS api_audit(
           ts TIMESTAMPTZ NOT NULL, principal VARCHAR, role VARCHAR, via VARCHAR,
           method VARCHAR NOT NULL, path VARCHAR NOT NULL, status INTEGER NOT NULL, client VARCHAR)""",
    # The cluster's shared trail (shared_audit.py): each row's id, the node that served the
    # call, and whether the row is in the shared stream yet (the table is its outbox).
    "ALTER TABLE api_audit ADD COLUMN IF NOT EXISTS id VARCHAR",
    "ALTER TABLE api_audit ADD COLUMN IF NOT EXISTS node VARCHAR",
    "ALTER TABLE api_audit ADD COLUMN IF NOT EXISTS shared BOOLEAN DEFAULT false",
    "UPDATE api_audit SET id = CAST(gen_random_uuid() AS VARCHAR) WHERE id IS NULL",
    "CREATE INDEX IF NOT EXISTS api_audit_id ON api_audit(id)",
]
#: api_audit's columns in the order record() and the shared trail write them.
AUDIT_COLUMNS = ("ts", "principal", "role", "via", "method", "path", "status", "client", "id", "node", "shared")


class AuthError(FluxError):
    """A token operation was refused; `field` names the input at fault."""

    def __init__(self, message: str, field: str = ""):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class TokenNameTaken(AuthError):
    def __init__(self, name: str):
        super().__init__(f"an API token named {name!r} exists; revoke it first or pick another name", "name")


class TokenNotFound(AuthError):
    def __init__(self, name: str):
        super().__init__(f"no API token named {name!r}", "name")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def ensure_tables(db) -> None:
    db.ensure(_TABLES)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: the token's name and role, and how it was presented."""

    name: str
    role: str
    via: str  # "bearer", "session" or "open" (api.auth_disabled_dangerously)
    session_id: str | None = field(default=None, repr=False)

    def has(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def public(self) -> dict:
        return {"name": self.name, "role": self.role, "via": self.via}


@dataclass(slots=True)
class TokenRecord:
    name: str
    role: str
    digest: str = field(repr=False)
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    created_by: str = ""
    builtin: bool = False  # the first-start token: not in the table, cannot be revoked here

    def valid(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "created_by": self.created_by,
            "builtin": self.builtin,
        }


class TokenStore:
    """Named API tokens: digests in `api_tokens` (mixer.duckdb), all of them cached in memory,
    so a request costs one SHA-256 and one dict lookup. Writes run on the owning thread."""

    def __init__(self, db, initial_token: str | None = None, initial_name: str = INITIAL_TOKEN_NAME):
        self.db = db
        self._by_digest: dict[str, TokenRecord] = {}
        self._by_name: dict[str, TokenRecord] = {}
        if db is not None:
            ensure_tables(db)
            for row in (
                db.cur()
                .execute("SELECT name, role, digest, created_at, expires_at, revoked_at, created_by FROM api_tokens")
                .fetchall()
            ):
                rec = TokenRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6] or "")
                self._index(rec)
        if initial_token:
            rec = TokenRecord(initial_name, ROLE_ADMIN, hash_token(initial_token), time.time(), builtin=True)
            self._index(rec)

    def _index(self, rec: TokenRecord) -> None:
        self._by_name[rec.name] = rec
        if rec.valid(time.time()):
            self._by_digest[rec.digest] = rec

    def lookup(self, token: str, now: float | None = None) -> TokenRecord | None:
        rec = self._by_digest.get(hash_token(token))
        if rec is None or not rec.valid(time.time() if now is None else now):
            return None
        return rec

    def list(self) -> list[TokenRecord]:
        return sorted(self._by_name.values(), key=lambda r: (not r.builtin, r.name))

    def create(self, name: str, role: str, ttl: float | None = None, created_by: str = "") -> tuple[TokenRecord, str]:
        """A new token: (its record, the token itself, to be shown once and never again)."""
        rec, token = self.new(name, role, ttl, created_by)
        self.apply(rec)
        log.info("API token %r created (role %s) by %s", name, role, created_by or "?")
        return rec, token

    def new(self, name: str, role: str, ttl: float | None = None, created_by: str = "") -> tuple[TokenRecord, str]:
        """A checked new token and its record, not stored yet (create(), or the cluster's
        shared state first: shared_identity.SharedIdentity)."""
        if not isinstance(name, str) or not TOKEN_NAME_RE.match(name):
            raise AuthError("1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit", "name")
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}; use one of {', '.join(ROLES)}", "role")
        if ttl is not None and not (0 < ttl <= 10 * 365 * 86400):
            raise AuthError("must be a positive number of seconds, at most ten years", "ttl")
        old = self._by_name.get(name)
        if old is not None and (old.builtin or old.revoked_at is None):
            raise TokenNameTaken(name)
        if sum(1 for r in self._by_name.values() if r.revoked_at is None) >= MAX_TOKENS:
            raise AuthError(f"at most {MAX_TOKENS} live API tokens; revoke some first", "name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        now = time.time()
        return TokenRecord(name, role, hash_token(token), now, now + ttl if ttl else None, None, created_by), token

    def apply(self, rec: TokenRecord) -> None:
        """Store `rec` (new, or as the cluster's shared state has it), replacing any record of
        its name; this node's first-start token is never replaced."""
        old = self._by_name.get(rec.name)
        if old is not None and old.builtin:
            return
        if old is not None and (old.digest, old.revoked_at, old.expires_at) == (rec.digest, rec.revoked_at,
                                                                                rec.expires_at):  # fmt: skip
            return
        if self.db is not None:
            cur = self.db.cur()
            cur.execute("DELETE FROM api_tokens WHERE name = ?", [rec.name])  # a revoked one of that name
            cur.execute(
                "INSERT INTO api_tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                [rec.name, rec.role, rec.digest, rec.created_at, rec.expires_at, rec.revoked_at, rec.created_by],
            )
        if old is not None:
            self._by_digest.pop(old.digest, None)
        self._index(rec)

    def get(self, name: str) -> TokenRecord | None:
        return self._by_name.get(name)

    def revocable(self, name: str) -> TokenRecord:
        """The record of `name`, or TokenNotFound / AuthError for the first-start token."""
        rec = self._by_name.get(name)
        if rec is None:
            raise TokenNotFound(name)
        if rec.builtin:
            raise AuthError(
                "the first-start token lives in <state_dir>/api-token (or api.auth_token): replace that file "
                "and restart the Mixer to change it",
                "name",
            )
        return rec

    def revoke(self, name: str, by: str = "") -> TokenRecord:
        rec = self.revocable(name)
        if rec.revoked_at is None:
            rec.revoked_at = time.time()
            if self.db is not None:
                self.db.cur().execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ?", [rec.revoked_at, name])
            self._by_digest.pop(rec.digest, None)
            log.info("API token %r revoked by %s", name, by or "?")
        return rec


def _header_map(headers) -> Mapping[str, str]:
    """Starlette Headers / a dict (lower-case keys) / ASGI raw [(b"name", b"value")]."""
    if isinstance(headers, Mapping) or hasattr(headers, "getlist"):
        return headers
    out: dict[str, str] = {}
    for k, v in headers:
        key = k.decode("latin-1").lower() if isinstance(k, bytes) else str(k).lower()
        val = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        out.setdefault(key, val)  # first wins, like Starlette's Headers.get
    return out


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip()
    return None


class Authenticator:
    """Tokens + sessions: who a request comes from, as a pure function of its headers."""

    def __init__(self, tokens: TokenStore, sessions: SessionStore, open_access: bool = False):
        self.tokens = tokens
        self.sessions = sessions
        self.open_access = open_access  # api.auth_disabled_dangerously with no token at all
        self.shared = None  # shared_identity.SharedIdentity on a Mixer with a bus (set by the app)

    def check(self, headers, method: str = "GET") -> tuple[Principal | None, str]:
        """(principal, why not): the reason is empty when a principal is returned."""
        if self.open_access:
            return Principal("anonymous", ROLE_ADMIN, "open"), ""
        h = _header_map(headers)
        auth = h.get("authorization")
        if auth:
            scheme, _, cred = auth.partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                return None, "missing or wrong bearer token"
            rec = self.tokens.lookup(cred.strip())
            if rec is None:
                return None, "missing or wrong bearer token"
            return Principal(rec.name, rec.role, "bearer"), ""
        sid = _cookie(h.get("cookie") or "", SESSION_COOKIE)
        if not sid:
            return None, "missing or wrong bearer token"
        s = self.sessions.get(sid)
        rec = None if s is None else self.tokens._by_digest.get(s.token_digest)
        if rec is None or not rec.valid(time.time()):
            return None, "session expired or logged out: log in again"
        if method.upper() not in SAFE_METHODS:
            sent = h.get(CSRF_HEADER) or ""
            if not hmac.compare_digest(sent.encode(), s.csrf.encode()):
                return None, f"CSRF token missing or wrong (send the session's token in {CSRF_HEADER})"
            origin = h.get("origin")
            if origin and not _same_origin(origin, h.get("host") or ""):
                return None, f"Origin {origin!r} is not this Mixer"
        return Principal(rec.name, rec.role, "session", s.id), ""

    def authenticate(self, headers, method: str = "GET") -> Principal | None:
        """The principal behind `headers` (see check()), or None. Reads headers only."""
        return self.check(headers, method)[0]

    def login(self, token: str) -> Session | None:
        rec = self.tokens.lookup(token)
        return None if rec is None else self.sessions.create(rec)

    def revoke(self, name: str, by: str = "") -> TokenRecord:
        rec = self.tokens.revoke(name, by)
        self.sessions.drop_token(rec.digest)
        return rec

    async def create_token(self, name: str, role: str, ttl: float | None = None, created_by: str = ""):
        """(record, token): through the cluster's shared state when there is one (every node
        accepts the token at once), else in this Mixer's table."""
        if self.shared is not None:
            return await self.shared.create_token(name, role, ttl, created_by)
        return self.tokens.create(name, role, ttl, created_by)

    async def revoke_token(self, name: str, by: str = "") -> TokenRecord:
        if self.shared is not None:
            await self.shared.revoke(name, by)
        return self.revoke(name, by)


def _same_origin(origin: str, host: str) -> bool:
    _, _, rest = origin.partition("://")
    return bool(host) and rest.rstrip("/").lower() == host.lower()


def authenticate_scope(scope: dict) -> Principal | None:
    """For an ASGI middleware: the principal of an HTTP `scope` (headers and method only; the
    body is not touched), through the app's Authenticator (`app.state.auth`, set by
    create_app). None when the credentials are missing or wrong, or no app is in the scope."""
    app = scope.get("app")
    auth = getattr(getattr(app, "state", None), "auth", None)
    if auth is None:
        return None
    return auth.authenticate(scope.get("headers") or [], scope.get("method", "GET"))


#: The front door (guard.py) refuses some requests before any route runs (401 before the body,
#: 413, 408, 503): each gets an audit row, but at most one per client address and status in
#: this many seconds, so a flood of refusals is not a flood of writes; the rest are counted and
#: summed up in one WARNING per window. At most REFUSAL_AUDIT_CLIENTS addresses are followed.
REFUSAL_AUDIT_WINDOW_S = 10.0
REFUSAL_AUDIT_CLIENTS = 10_000


class RefusalAudit:
    """`guard.GuardMiddleware`'s `on_refused`: audit rows for what the front door refused, for
    state-changing methods as AuditMiddleware does, bounded (REFUSAL_AUDIT_WINDOW_S)."""

    def __init__(self, audit: AuditLog, window: float = REFUSAL_AUDIT_WINDOW_S, clock=time.monotonic):
        self.audit = audit
        self.window = window
        self.clock = clock
        self.audited = 0
        self.suppressed = 0  # in the current window
        self._last: dict[tuple[str, int], float] = {}  # (client address, status) -> when audited
        self._window_start = clock()

    def __call__(self, scope, status: int) -> None:
        method = scope.get("method", "GET")
        if method in SAFE_METHODS:
            return
        now = self.clock()
        if now - self._window_start >= self.window:
            if self.suppressed:
                log.warning("front door: %d more refused requests in the last %.0fs were not audited one by one "
                            "(one row per client address and status per window)", self.suppressed, self.window)  # fmt: skip
            self.suppressed = 0
            self._window_start = now
            self._last = {k: t for k, t in self._last.items() if now - t < self.window}
        client = scope.get("client")
        key = (client[0] if client else "", status)
        last = self._last.get(key)
        if (last is not None and now - last < self.window) or (
            last is None and len(self._last) >= REFUSAL_AUDIT_CLIENTS
        ):
            self.suppressed += 1
            return
        self._last[key] = now
        principal = None if status == 401 else authenticate_scope(scope)
        self.audit.record(
            principal, method, scope.get("path", ""), status, f"{client[0]}:{client[1]}" if client else ""
        )
        self.audited += 1


class AuditLog:
    """`api_audit` rows: one per state-changing API call. `node` names this Mixer node in each
    row; `on_record`, when set (shared_audit.SharedAudit), is called after each row is written,
    to share it with the other nodes."""

    def __init__(self, db, node: str = ""):
        self.db = db
        self.node = node
        self.on_record = None
        if db is not None:
            ensure_tables(db)

    def record(self, principal: Principal | None, method: str, path: str, status: int, client: str = "") -> None:
        if self.db is None:
            return
        try:
            self.db.cur().execute(
                f"INSERT INTO api_audit ({', '.join(AUDIT_COLUMNS)}) VALUES (now(), ?, ?, ?, ?, ?, ?, ?, ?, ?, false)",
                [
                    principal.name if principal else None,
                    principal.role if principal else None,
                    principal.via if principal else None,
                    method[:AUDIT_METHOD_CHARS],
                    path[:AUDIT_PATH_CHARS],
                    status,
                    client[:AUDIT_CLIENT_CHARS],
                    uuid7_str(),
                    self.node,
                ],
            )
        except Exception as exc:  # the call happened; a failed audit row is logged, not hidden
            log.error("audit row not written for %s %s (%s): %s", method, path, status, exc)
            return
        if self.on_record is not None:
            self.on_record()

    def list(
        self, limit: int = AUDIT_SHOWN, path_contains: str | None = None, principal: str | None = None
    ) -> list[dict]:
        if self.db is None:
            return []
        where, args = [], []
        if path_contains:
            where.append("strpos(path, ?) > 0")
            args.append(path_contains)
        if principal:
            where.append("principal = ?")
            args.append(principal)
        sql = "SELECT ts, principal, role, via, method, path, status, client, node FROM api_audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        rows = self.db.cur().execute(sql, [*args, max(1, min(int(limit), 10 * AUDIT_SHOWN))]).fetchall()
        keys = ("ts", "principal", "role", "via", "method", "path", "status", "client", "node")
        return [{**dict(zip(keys, r)), "ts": r[0].isoformat()} for r in rows]


class AuditMiddleware:
    """ASGI: after each state-changing HTTP request, one audit row with the principal the
    auth dependency put in `scope["state"]["principal"]` (None when it was refused) and the
    response status."""

    def __init__(self, app, audit: AuditLog, refusals: RefusalAudit | None = None):
        self.app = app
        self.audit = audit
        self.refusals = refusals  # a request without credentials, refused: bounded like the front door's

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method", "GET") in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = scope.get("state") or {}
            principal = state.get("principal")
            if principal is None and status["code"] < 400:
                principal = authenticate_scope(scope)  # e.g. a login: the session's owner
            client = scope.get("client")
            if principal is None and status["code"] == 401 and self.refusals is not None:
                self.refusals(scope, 401)
            else:
                self.audit.record(
                    principal,
                    scope.get("method", ""),
                    scope.get("path", ""),
                    status["code"],
                    f"{client[0]}:{client[1]}" if client else "",
                )
