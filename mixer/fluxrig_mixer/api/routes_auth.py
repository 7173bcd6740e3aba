"""Routes: operator identity: console login/logout, the session, named API tokens, the audit trail.

POST /api/v1/auth/login {"token": ...} is the one state-changing route without credentials:
it trades a valid API token for a session cookie (auth.SESSION_COOKIE: HttpOnly,
SameSite=Strict, Path=/, Max-Age = the session's life, Secure over HTTPS) and answers the
session's CSRF token, which the console sends in X-CSRF-Token on every state-changing call.
Failed logins are limited per client address (LOGIN_FAILURES_ALLOWED per LOGIN_WINDOW_S, then
429). GET /api/v1/auth/session says who the caller is (and the CSRF token for a session, so
a reloaded page can go on); POST /api/v1/auth/logout ends the session.

GET/POST /api/v1/auth/tokens and DELETE /api/v1/auth/tokens/{name} need the admin role: a
created token is answered once and only its SHA-256 digest is kept; revoking ends the
sessions opened with it. GET /api/v1/audit lists state-changing calls (who, when, what,
status), newest first.
"""

from __future__ import annotations

import time
from collections import deque

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from .auth import AUDIT_SHOWN, ROLE_READ, SESSION_COOKIE, Principal
from .services import Admin, Caller

__all__ = [
    "router",
    "LoginBody",
    "TokenBody",
    "LOGIN_FAILURES_ALLOWED",
    "LOGIN_WINDOW_S",
    "MAX_TOKEN_CHARS",
    "login",
    "logout",
    "session",
    "list_tokens",
    "create_token",
    "revoke_token",
    "audit",
]

LOGIN_FAILURES_ALLOWED = 10
LOGIN_WINDOW_S = 60.0
MAX_TOKEN_CHARS = 512
_MAX_TRACKED_CLIENTS = 4096

router = APIRouter(tags=["auth"])


class LoginBody(BaseModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)


class TokenBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: str = ROLE_READ
    ttl: float | None = Field(None, description="seconds the token stays valid; none = until revoked")


class _Failures:
    """Failed logins per client address in a sliding window (bounded)."""

    def __init__(self):
        self.seen: dict[str, deque] = {}

    def blocked(self, client: str, now: float) -> bool:
        q = self.seen.get(client)
        if q is None:
            return False
        while q and now - q[0] > LOGIN_WINDOW_S:
            q.popleft()
        return len(q) >= LOGIN_FAILURES_ALLOWED

    def add(self, client: str, now: float) -> None:
        if client not in self.seen and len(self.seen) >= _MAX_TRACKED_CLIENTS:
            self.seen.pop(next(iter(self.seen)))
        self.seen.setdefault(client, deque()).append(now)


def _failures(request: Request) -> _Failures:
    state = request.app.state
    if not hasattr(state, "login_failures"):
        state.login_failures = _Failures()
    return state.login_failures


@router.post("/api/v1/auth/login")
async def login(request: Request, response: Response, body: LoginBody):
    """Trade an API token for a console session cookie; answers the session's CSRF token."""
    client = request.client.host if request.client else "?"
    now = time.time()
    failures = _failures(request)
    if failures.blocked(client, now):
        raise HTTPException(429, f"too many failed logins from {client}; wait {int(LOGIN_WINDOW_S)} s")
    auth = request.app.state.auth
    s = auth.login(body.token.strip())
    if s is None:
        failures.add(client, now)
        raise HTTPException(401, "unknown, expired or revoked API token")
    request.state.principal = Principal(s.name, s.role, "session", s.id)
    response.set_cookie(
        SESSION_COOKIE,
        s.id,
        max_age=max(1, int(s.expires_at - now)),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    response.headers["Cache-Control"] = "no-store"
    return s.public()


@router.post("/api/v1/auth/logout")
async def logout(request: Request, response: Response, who: Caller):
    if who.session_id:
        request.app.state.auth.sessions.delete(who.session_id)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return {"status": "logged_out", "name": who.name}


@router.get("/api/v1/auth/session")
async def session(request: Request, response: Response, who: Caller):
    """Who the caller is; for a console session also its CSRF token and expiry."""
    response.headers["Cache-Control"] = "no-store"
    out = who.public()
    if who.session_id:
        s = request.app.state.auth.sessions.get(who.session_id)
        if s is not None:
            out.update(csrf=s.csrf, expires_at=s.expires_at)
    return out


@router.get("/api/v1/auth/tokens")
async def list_tokens(request: Request, _who: Admin):
    return [r.public() for r in request.app.state.auth.tokens.list()]


@router.post("/api/v1/auth/tokens", status_code=201)
async def create_token(request: Request, response: Response, body: TokenBody, who: Admin):
    """A new named token (read, operate or admin). The token is in this answer only."""
    rec, token = await request.app.state.auth.create_token(body.name, body.role, body.ttl, created_by=who.name)
    response.headers["Cache-Control"] = "no-store"
    return {**rec.public(), "token": token}


@router.delete("/api/v1/auth/tokens/{name}")
async def revoke_token(request: Request, name: str, who: Admin):
    return (await request.app.state.auth.revoke_token(name, by=who.name)).public()


@router.get("/api/v1/audit")
async def audit(
    request: Request,
    _who: Caller,
    limit: int = Query(AUDIT_SHOWN, ge=1, le=10 * AUDIT_SHOWN),
    path: str | None = Query(None, description="only calls whose path contains this (e.g. a Rack name)"),
    principal: str | None = Query(None, description="only calls made with this token name"),
):
    """State-changing API calls, newest first: when, who (token name, role, bearer/session), what, status."""
    return request.app.state.audit.list(limit, path, principal)
