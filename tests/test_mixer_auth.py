"""Operator identity (api/auth.py, routes_auth.py): named API tokens with roles stored as
digests, console sessions (HttpOnly SameSite=Strict cookie, CSRF on every state-changing call,
logout, expiry) and the audit trail, over the real app on a real DuckDB file (httpx's ASGI
transport; the browser suite drives the same through a real server)."""

from __future__ import annotations

import time

import httpx
import pytest
from fluxrig_mixer.api import create_app
from fluxrig_mixer.api.auth import (
    CSRF_HEADER,
    INITIAL_TOKEN_NAME,
    SESSION_COOKIE,
    Authenticator,
    AuthError,
    SessionStore,
    TokenStore,
    authenticate_scope,
    hash_token,
)
from test_mixer_api import TOKEN, _services

from fluxrig.wire import identity

BASE = "http://t"


def _client(app, token: str | None = None, **headers) -> httpx.AsyncClient:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers=headers)


async def _new_token(app, name: str, role: str, **extra) -> str:
    async with _client(app, TOKEN) as admin:
        r = await admin.post("/api/v1/auth/tokens", json={"name": name, "role": role, **extra})
        assert r.status_code == 201, r.text
        return r.json()["token"]


async def test_roles_read_operate_admin_and_digests_only(tmp_path):
    services, db = _services(tmp_path)
    services.registry.create("edge-1", nkey=identity.public_key(identity.new_user_seed()))
    app = create_app(services)
    try:
        reader = await _new_token(app, "grafana", "read")
        operator = await _new_token(app, "night-shift", "operate")
        rows = db.conn.execute("SELECT name, role, digest FROM api_tokens ORDER BY name").fetchall()
        assert rows == [("grafana", "read", hash_token(reader)), ("night-shift", "operate", hash_token(operator))]
        dump = str(db.conn.execute("SELECT * FROM api_tokens").fetchall())
        assert reader not in dump and operator not in dump
        async with _client(app, reader) as api:
            assert (await api.get("/api/v1/racks")).status_code == 200
            r = await api.post("/api/v1/racks/edge-1/approve")
            assert r.status_code == 403 and "may only read" in r.json()["error"]
            assert (await api.get("/api/v1/auth/tokens")).status_code == 403
        async with _client(app, operator) as api:
            # Past the role check: the approval reaches the shared state, which this bus-less
            # test does not run (503, nothing written; test_mixer_shared_state approves for real).
            r = await api.post("/api/v1/racks/edge-1/approve")
            assert r.status_code == 503 and "shared state" in r.json()["error"], r.text
            r = await api.post("/api/v1/auth/tokens", json={"name": "x", "role": "admin"})
            assert r.status_code == 403 and "needs admin" in r.json()["error"]
        async with _client(app, TOKEN) as admin:
            listed = {t["name"]: t for t in (await admin.get("/api/v1/auth/tokens")).json()}
            assert listed[INITIAL_TOKEN_NAME]["role"] == "admin" and listed[INITIAL_TOKEN_NAME]["builtin"]
            assert "token" not in listed["grafana"] and "digest" not in listed["grafana"]
            r = await admin.post("/api/v1/auth/tokens", json={"name": "grafana", "role": "read"})
            assert r.status_code == 400 and "exists" in r.json()["error"]
            r = await admin.post("/api/v1/auth/tokens", json={"name": "bad name!", "role": "read"})
            assert r.status_code == 400 and r.json()["error"].startswith("name:")
            r = await admin.post("/api/v1/auth/tokens", json={"name": "n", "role": "root"})
            assert r.status_code == 400 and r.json()["error"].startswith("role:")
            assert (await admin.delete(f"/api/v1/auth/tokens/{INITIAL_TOKEN_NAME}")).status_code == 400
            assert (await admin.delete("/api/v1/auth/tokens/nope")).status_code == 404
            assert (await admin.delete("/api/v1/auth/tokens/grafana")).status_code == 200
        async with _client(app, reader) as api:
            assert (await api.get("/api/v1/racks")).status_code == 401
        # Tokens outlive the app: a new store over the same file knows them (and the revocation).
        again = TokenStore(db, TOKEN)
        assert again.lookup(operator).name == "night-shift" and again.lookup(reader) is None
        assert again.lookup(TOKEN).role == "admin" and again.lookup("frx_guess") is None
    finally:
        db.close()


async def test_an_expired_token_is_refused(tmp_path):
    services, db = _services(tmp_path)
    app = create_app(services)
    try:
        short = await _new_token(app, "short", "read", ttl=0.3)
        async with _client(app, short) as api:
            assert (await api.get("/api/v1/racks")).status_code == 200
            time.sleep(0.4)
            assert (await api.get("/api/v1/racks")).status_code == 401
    finally:
        db.close()


async def test_login_cookie_csrf_logout(tmp_path):
    services, db = _services(tmp_path)
    services.registry.create("edge-1", nkey=identity.public_key(identity.new_user_seed()))
    app = create_app(services)
    try:
        async with _client(app) as browser:
            assert (await browser.get("/docs")).status_code == 401
            r = await browser.post("/api/v1/auth/login", json={"token": "wrong"})
            assert r.status_code == 401 and SESSION_COOKIE not in r.headers.get("set-cookie", "")
            r = await browser.post("/api/v1/auth/login", json={"token": TOKEN})
            assert r.status_code == 200, r.text
            cookie = r.headers["set-cookie"]
            assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie
            assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
            assert "Max-Age=" in cookie and "Path=/" in cookie
            csrf = r.json()["csrf"]
            assert r.json()["name"] == INITIAL_TOKEN_NAME and r.json()["role"] == "admin"
            # Reads with the cookie alone; /docs opens for the session.
            assert (await browser.get("/api/v1/racks")).status_code == 200
            assert (await browser.get("/docs")).status_code == 200
            assert (await browser.get("/api/v1/auth/session")).json()["csrf"] == csrf
            # A state-changing call needs the CSRF token, and a same-origin Origin when one is sent.
            r = await browser.post("/api/v1/racks/edge-1/approve")
            assert r.status_code == 403 and "CSRF" in r.json()["error"]
            r = await browser.post("/api/v1/racks/edge-1/approve", headers={CSRF_HEADER: csrf[:-1] + "x"})
            assert r.status_code == 403
            r = await browser.post(
                "/api/v1/racks/edge-1/approve", headers={CSRF_HEADER: csrf, "Origin": "http://evil.example"}
            )
            assert r.status_code == 403 and "Origin" in r.json()["error"]
            r = await browser.post("/api/v1/racks/edge-1/approve", headers={CSRF_HEADER: csrf, "Origin": BASE})
            assert r.status_code == 503 and "shared state" in r.json()["error"], r.text  # past CSRF; no bus here
            sid = browser.cookies[SESSION_COOKIE]
            r = await browser.post("/api/v1/auth/logout", headers={CSRF_HEADER: csrf})
            assert r.status_code == 200
            assert (await browser.get("/api/v1/racks")).status_code == 401
        # The old cookie, replayed after logout, is dead.
        async with _client(app, Cookie=f"{SESSION_COOKIE}={sid}") as replay:
            assert (await replay.get("/api/v1/racks")).status_code == 401
        # Who did what: the audit names the token behind the session, refusals included.
        async with _client(app, TOKEN) as admin:
            rows = (await admin.get("/api/v1/audit")).json()
        seen = [(a["principal"], a["via"], a["method"], a["path"], a["status"]) for a in reversed(rows)]
        assert seen == [
            (None, None, "POST", "/api/v1/auth/login", 401),
            (INITIAL_TOKEN_NAME, "session", "POST", "/api/v1/auth/login", 200),
            (None, None, "POST", "/api/v1/racks/edge-1/approve", 403),
            (None, None, "POST", "/api/v1/racks/edge-1/approve", 403),
            (None, None, "POST", "/api/v1/racks/edge-1/approve", 403),
            (INITIAL_TOKEN_NAME, "session", "POST", "/api/v1/racks/edge-1/approve", 503),  # no bus here
            (INITIAL_TOKEN_NAME, "session", "POST", "/api/v1/auth/logout", 200),
        ], seen
    finally:
        db.close()


async def test_revoking_a_token_ends_its_sessions_and_sessions_expire(tmp_path):
    services, db = _services(tmp_path, **{"console.session_idle": 0.5})
    app = create_app(services)
    try:
        tok = await _new_token(app, "ops", "operate")
        async with _client(app) as browser:
            assert (await browser.post("/api/v1/auth/login", json={"token": tok})).status_code == 200
            assert (await browser.get("/api/v1/racks")).status_code == 200
            async with _client(app, TOKEN) as admin:
                assert (await admin.delete("/api/v1/auth/tokens/ops")).status_code == 200
            assert (await browser.get("/api/v1/racks")).status_code == 401
            assert (await browser.post("/api/v1/auth/login", json={"token": TOKEN})).status_code == 200
            time.sleep(0.6)  # idle past console.session_idle
            r = await browser.get("/api/v1/racks")
            assert r.status_code == 401 and "log in again" in r.json()["error"]
    finally:
        db.close()


async def test_failed_logins_are_limited(tmp_path):
    services, db = _services(tmp_path)
    app = create_app(services)
    try:
        async with _client(app) as browser:
            codes = [(await browser.post("/api/v1/auth/login", json={"token": f"x{i}"})).status_code for i in range(11)]
            assert codes == [401] * 10 + [429]
            assert (await browser.post("/api/v1/auth/login", json={"token": TOKEN})).status_code == 429
    finally:
        db.close()


def test_authenticate_reads_raw_asgi_headers_only():
    tokens = TokenStore(None, "root-token")
    auth = Authenticator(tokens, SessionStore())
    assert auth.authenticate([(b"authorization", b"Bearer root-token")], "POST").name == INITIAL_TOKEN_NAME
    assert auth.authenticate([(b"authorization", b"Bearer nope")], "GET") is None
    assert auth.authenticate([(b"authorization", b"Basic cm9vdA==")], "GET") is None
    assert auth.authenticate([], "GET") is None
    s = auth.login("root-token")
    cookie = (b"cookie", f"a=b; {SESSION_COOKIE}={s.id}".encode())
    assert auth.authenticate([cookie], "GET").via == "session"
    assert auth.authenticate([cookie], "DELETE") is None  # no CSRF token
    assert auth.authenticate([cookie, (CSRF_HEADER.encode(), s.csrf.encode())], "DELETE").name == INITIAL_TOKEN_NAME

    class App:
        class state:
            pass

    App.state.auth = auth
    scope = {"type": "http", "app": App, "method": "GET", "headers": [(b"authorization", b"Bearer root-token")]}
    assert authenticate_scope(scope).role == "admin"
    assert authenticate_scope({"type": "http", "headers": []}) is None
    with pytest.raises(AuthError):
        tokens.create("bad name", "read")


def test_each_cluster_node_has_its_own_first_start_token_id():
    """Three nodes creating one "first-start" id left two of their bundles refused."""
    from fluxrig_mixer.tokens import _ID_RE, FIRST_TOKEN_ID, first_token_id

    assert first_token_id(None) == FIRST_TOKEN_ID
    long = "mixer-hub-frankfurt-rack-row-{}.example.internal"
    names = ["node1", "node2", "Node_3", long.format(1), long.format(2), "###"]
    ids = [first_token_id(n) for n in names]
    assert len(set(ids)) == len(ids) and all(_ID_RE.match(i) for i in ids), ids
    assert first_token_id("node1") == first_token_id("node1")  # a restart keeps it


async def test_refusals_are_audited_once_per_client_and_status_per_window(tmp_path):
    """A stranger's flood of refused requests is one audit row (and a counter), not a flood of
    writes; what the front door refuses before any route runs (413 from Content-Length) is
    audited too, with the principal it came with."""
    services, db = _services(tmp_path)
    app = create_app(services)
    try:
        async with _client(app) as stranger:
            for _ in range(30):
                r = await stranger.post("/api/v1/racks/edge-1/approve", content=b"{}")
                assert r.status_code == 401
        async with _client(app, TOKEN) as admin:
            r = await admin.post("/api/v1/scenarios/import", content=b"#" * (11 * 1024 * 1024))
            assert r.status_code == 413, r.text
            rows = (await admin.get("/api/v1/audit")).json()
        seen = [(a["principal"], a["method"], a["path"], a["status"]) for a in reversed(rows)]
        assert seen == [
            (None, "POST", "/api/v1/racks/edge-1/approve", 401),
            (INITIAL_TOKEN_NAME, "POST", "/api/v1/scenarios/import", 413),
        ], seen
        assert app.state.refusals.suppressed == 29 and app.state.refusals.audited == 2
    finally:
        db.close()
