"""Console sessions as signed cookies: they survive a Mixer restart and any Mixer of a cluster accepts them.

Job. A console login trades an API token for a session (api/auth.py checks the token). The
session is not held by the Mixer: it is the cookie itself, signed with a key every Mixer of
the cluster derives from the cluster key (`session_key(cluster_key)`: a deterministic Ed25519
signature of a fixed label, hashed; the label is signed for nothing else and the result never
leaves the Mixer). A restarted Mixer, or another node holding the same cluster.key, verifies
the cookie with no shared table.

Cookie value: `v1.<payload>.<mac>`, both base64url; payload = compact JSON
  i  session id (random, SESSION_ID_BYTES)          n, r  token name and role at login
  t  SHA-256 digest of the token (the session ends when that token is revoked or expires:
     auth.Authenticator looks it up on every request)
  c  created, e  expires (min of console.session_ttl and the token's own expiry),
  s  last seen (console.session_idle is measured from it)
mac = HMAC-SHA256(key, "fluxrig-session-v1." + payload). A changed byte, an expired or idle
cookie is refused. The CSRF token is HMAC(key, "csrf." + id): nothing to store either.

Idle time. Each request that uses a session older than `refresh_after` (REFRESH_AFTER_S, or
a quarter of the idle time when shorter) is answered with the same session re-signed with
s = now (SessionRefreshMiddleware adds the Set-Cookie), so a used console stays logged in
and an unused one ends after console.session_idle, as before.

Logout. The browser's cookie is deleted, and the session id is remembered as logged out
until the session would have expired: in memory and in the `console_logouts` table of
mixer.duckdb, so a restart keeps it (bounded: MAX_LOGOUTS, expired rows pruned). That
table is this Mixer's cache: on a Mixer with a bus the logout also goes to the cluster's
shared state (shared_identity.py), and every node refuses the session from then on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

__all__ = [
    "Session",
    "SessionStore",
    "SessionRefreshMiddleware",
    "session_key",
    "COOKIE_VERSION",
    "SESSION_ID_BYTES",
    "REFRESH_AFTER_S",
    "MAX_LOGOUTS",
    "MAX_COOKIE_CHARS",
    "DEFAULT_SESSION_TTL_S",
    "DEFAULT_SESSION_IDLE_S",
    "KEY_LABEL",
]

log = logging.getLogger("fluxrig.mixer.sessions")

COOKIE_VERSION = "v1"
SESSION_ID_BYTES = 16
REFRESH_AFTER_S = 60.0
MAX_LOGOUTS = 100_000
MAX_COOKIE_CHARS = 1024  # a longer cookie is refused before any decoding
DEFAULT_SESSION_TTL_S = 12 * 3600.0
DEFAULT_SESSION_IDLE_S = 3600.0
KEY_LABEL = b"fluxrig console session cookie key v1"

_TABLE = "CREATE TABLE IF NOT EXISTS console_logouts(id_digest VARCHAR PRIMARY KEY, expires_at DOUBLE NOT NULL)"


def session_key(cluster_key) -> bytes:
    """The cookie-signing key of every Mixer holding `cluster_key` (fluxrig.passport.ClusterKey)."""
    return hashlib.sha256(b"fluxrig-session-key\0" + cluster_key.sign(KEY_LABEL)).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(slots=True)
class Session:
    id: str = field(repr=False)  # the cookie value
    sid: str = field(repr=False)  # the session's own id inside it
    csrf: str = field(repr=False)
    name: str
    role: str
    token_digest: str = field(repr=False)
    created_at: float
    expires_at: float
    last_used: float

    def public(self) -> dict:
        return {"name": self.name, "role": self.role, "csrf": self.csrf, "expires_at": self.expires_at}


class SessionStore:
    """Makes and checks signed session cookies (module docstring). `key` is the signing key
    (session_key(cluster_key)); without one a random key is made, so sessions end with this
    process (tests, or a Mixer without a cluster key)."""

    def __init__(
        self,
        ttl: float = DEFAULT_SESSION_TTL_S,
        idle: float = DEFAULT_SESSION_IDLE_S,
        limit: int = MAX_LOGOUTS,
        key: bytes | None = None,
        db=None,
        refresh_after: float = REFRESH_AFTER_S,
    ):
        self.ttl = ttl
        self.idle = idle
        self.limit = limit  # logged-out sessions remembered at once
        self.refresh_after = min(refresh_after, idle / 4)
        if key is None:
            key = secrets.token_bytes(32)
            log.info("console sessions signed with a per-process key: they end when this process stops")
        self._key = key
        self.db = db
        self._logouts: dict[str, float] = {}  # digest of a logged-out session id -> its expiry
        self.on_logout = None  # (digest, expires_at) -> None: tell the cluster (SharedIdentity)
        if db is not None:
            db.ensure([_TABLE])
            now = time.time()
            cur = db.cur()
            cur.execute("DELETE FROM console_logouts WHERE expires_at <= ?", [now])
            for digest, expires in cur.execute("SELECT id_digest, expires_at FROM console_logouts").fetchall():
                self._logouts[digest] = expires

    # -- making ---------------------------------------------------------------------------------
    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, b"fluxrig-session-v1." + payload.encode("ascii"), hashlib.sha256).digest()

    def _csrf(self, sid: str) -> str:
        return _b64(hmac.new(self._key, b"csrf." + sid.encode("ascii"), hashlib.sha256).digest())

    def _seal(self, s: Session) -> str:
        body = {"i": s.sid, "n": s.name, "r": s.role, "t": s.token_digest, "c": round(s.created_at, 3),
                "e": round(s.expires_at, 3), "s": round(s.last_used, 3)}  # fmt: skip
        payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{COOKIE_VERSION}.{payload}.{_b64(self._mac(payload))}"

    def create(self, rec, now: float | None = None) -> Session:
        """A new session for the token record `rec` (auth.TokenRecord)."""
        now = time.time() if now is None else now
        expires = now + self.ttl
        if rec.expires_at is not None:
            expires = min(expires, rec.expires_at)
        sid = _b64(secrets.token_bytes(SESSION_ID_BYTES))
        s = Session("", sid, self._csrf(sid), rec.name, rec.role, rec.digest, now, expires, now)
        s.id = self._seal(s)
        return s

    # -- checking -------------------------------------------------------------------------------
    def _open(self, cookie: str) -> Session | None:
        if not cookie or len(cookie) > MAX_COOKIE_CHARS:
            return None
        version, _, rest = cookie.partition(".")
        payload, _, mac = rest.partition(".")
        if version != COOKIE_VERSION or not payload or not mac:
            return None
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(payload)):
                return None
            body = json.loads(_unb64(payload))
            sid = str(body["i"])
            return Session(cookie, sid, self._csrf(sid), str(body["n"]), str(body["r"]), str(body["t"]),
                           float(body["c"]), float(body["e"]), float(body["s"]))  # fmt: skip
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeError):
            return None

    def get(self, cookie: str, now: float | None = None) -> Session | None:
        """The session a cookie holds, or None (forged, expired, idle too long, logged out)."""
        s = self._open(cookie)
        if s is None:
            return None
        now = time.time() if now is None else now
        if now >= s.expires_at or now - s.last_used >= self.idle:
            return None
        if _digest(s.sid) in self._logouts:
            return None
        return s

    def refreshed(self, cookie: str, now: float | None = None) -> tuple[str, int] | None:
        """(a re-signed cookie with last seen = now, its Max-Age) when the session is valid and
        was last re-signed more than refresh_after ago; else None."""
        now = time.time() if now is None else now
        s = self.get(cookie, now)
        if s is None or now - s.last_used < self.refresh_after:
            return None
        s.last_used = now
        return self._seal(s), max(1, int(s.expires_at - now))

    # -- ending ---------------------------------------------------------------------------------
    def delete(self, cookie: str) -> bool:
        """Log the session out: remembered until it would have expired (module docstring)."""
        s = self._open(cookie)
        if s is None:
            return False
        now = time.time()
        self.sweep(now)
        digest = _digest(s.sid)
        if digest in self._logouts:
            return False
        self.remember_logout(digest, s.expires_at)
        if self.on_logout is not None:
            self.on_logout(digest, s.expires_at)
        return True

    def remember_logout(self, digest: str, expires_at: float) -> None:
        """A logged-out session id (its digest), here or on another node of the cluster
        (shared_identity.SharedIdentity), refused until `expires_at`."""
        if expires_at <= time.time() or self._logouts.get(digest) == expires_at:
            return
        if digest not in self._logouts and len(self._logouts) >= self.limit:
            oldest = min(self._logouts, key=self._logouts.get)
            log.warning("%d logged-out sessions remembered: forgetting the one expiring first", self.limit)
            self._forget(oldest)
        self._logouts[digest] = expires_at
        if self.db is not None:
            try:
                self.db.cur().execute("INSERT OR REPLACE INTO console_logouts VALUES (?, ?)", [digest, expires_at])
            except Exception as exc:  # logged out here; a restart would forget it: say so
                log.error("logout not stored in mixer.duckdb (a restart would accept the session again): %s", exc)

    def drop_token(self, digest: str) -> int:
        """Sessions of a revoked token end by themselves: auth.Authenticator checks the token
        on every request. Kept for callers; nothing to drop."""
        return 0

    def _forget(self, digest: str) -> None:
        self._logouts.pop(digest, None)
        if self.db is not None:
            self.db.cur().execute("DELETE FROM console_logouts WHERE id_digest = ?", [digest])

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        gone = [d for d, e in self._logouts.items() if e <= now]
        for d in gone:
            del self._logouts[d]
        if gone and self.db is not None:
            self.db.cur().execute("DELETE FROM console_logouts WHERE expires_at <= ?", [now])

    def logged_out(self) -> int:
        return len(self._logouts)


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode("ascii")).hexdigest()


class SessionRefreshMiddleware:
    """ASGI: a response to a request made with a session cookie due for re-signing carries the
    re-signed cookie (SessionStore.refreshed), so console.session_idle counts from the last use."""

    def __init__(self, app, sessions: SessionStore, cookie_name: str):
        self.app = app
        self.sessions = sessions
        self.cookie_name = cookie_name
        self._needle = cookie_name.encode("latin-1") + b"="

    def _cookie(self, scope) -> str | None:
        for k, v in scope.get("headers") or ():
            if k == b"cookie" and self._needle in v:
                for part in v.decode("latin-1").split(";"):
                    name, sep, value = part.strip().partition("=")
                    if sep and name == self.cookie_name:
                        return value.strip()
        return None

    async def __call__(self, scope, receive, send):
        cookie = self._cookie(scope) if scope["type"] == "http" else None
        if not cookie:
            await self.app(scope, receive, send)
            return

        async def send_refreshed(message):
            if message["type"] == "http.response.start" and message["status"] < 400:
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"set-cookie" for k, _ in headers):  # login/logout set their own
                    fresh = self.sessions.refreshed(cookie)
                    if fresh is not None:
                        value, max_age = fresh
                        secure = "; Secure" if scope.get("scheme") == "https" else ""
                        line = (f"{self.cookie_name}={value}; HttpOnly; Max-Age={max_age}; Path=/; "
                                f"SameSite=strict{secure}")  # fmt: skip
                        headers.append((b"set-cookie", line.encode("latin-1")))
                        message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_refreshed)
