"""Console sessions as signed cookies (api/sessions.py) and /docs without a CDN (api/routes_docs.py),
over the real app on real DuckDB files (httpx's ASGI transport; test_console_browser.py drives
the same through a real `fluxrig-mixer up` and Chromium).

* A session made before a Mixer restart is accepted after it (same state dir: same cluster
  key), and so is it by another Mixer holding the same cluster.key with its own database (a
  cluster node); a Mixer with another cluster key refuses it.
* A logout survives the restart (console_logouts in mixer.duckdb); a changed byte of the
  cookie is refused; a revoked token ends its sessions on the restarted Mixer too.
* A used session is re-signed (Set-Cookie with a fresh last-seen) and outlives
  console.session_idle; left alone it ends after it.
* /docs names only this Mixer's files; they are served without credentials under a CSP that
  allows nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import re
import shutil

import httpx
from fluxrig_mixer.api import create_app
from fluxrig_mixer.api.auth import CSRF_HEADER, SESSION_COOKIE
from fluxrig_mixer.api.routes_docs import DOCS_CSP, DOCS_FILES
from fluxrig_mixer.api.sessions import SessionStore
from test_mixer_api import TOKEN, _services

from fluxrig.wire import identity

BASE = "http://t"


def _client(app, cookie: str | None = None, token: str | None = None) -> httpx.AsyncClient:
    headers = {}
    if cookie:
        headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers=headers)


async def _login(app, token: str = TOKEN) -> tuple[str, str]:
    async with _client(app) as browser:
        r = await browser.post("/api/v1/auth/login", json={"token": token})
        assert r.status_code == 200, r.text
        return browser.cookies[SESSION_COOKIE], r.json()["csrf"]


async def _status(app, cookie: str, path: str = "/api/v1/racks") -> int:
    async with _client(app, cookie) as c:
        return (await c.get(path)).status_code


async def test_a_session_survives_a_restart_and_is_accepted_by_another_node(tmp_path):
    a = tmp_path / "a"
    services, db = _services(a)
    services.registry.create("edge-1", nkey=identity.public_key(identity.new_user_seed()))
    app = create_app(services)
    cookie, csrf = await _login(app)
    async with _client(app, cookie) as c:
        assert (await c.get("/api/v1/racks")).status_code == 200
        r = await c.post("/api/v1/auth/tokens", json={"name": "ops", "role": "operate"}, headers={CSRF_HEADER: csrf})
        ops = r.json()["token"]
    ops_cookie, _ = await _login(app, ops)
    db.close()

    # The same Mixer, restarted (new app, same state dir and database).
    services, db = _services(a)
    app = create_app(services)
    try:
        assert await _status(app, cookie) == 200
        async with _client(app, cookie) as c:
            assert (await c.get("/api/v1/auth/session")).json()["csrf"] == csrf  # same CSRF token
            # a state-changing call with the session's CSRF token (one that needs no Snake)
            body = {"name": "after-restart", "role": "read"}
            r = await c.post("/api/v1/auth/tokens", json=body, headers={CSRF_HEADER: csrf})
            assert r.status_code == 201, r.text
            r = await c.post("/api/v1/racks/edge-1/suspend", headers={CSRF_HEADER: "x" + csrf[1:]})
            assert r.status_code == 403
        assert await _status(app, ops_cookie) == 200
        # A changed byte anywhere in the cookie is refused.
        for i in (3, len(cookie) // 2, len(cookie) - 2):
            forged = cookie[:i] + ("A" if cookie[i] != "A" else "B") + cookie[i + 1 :]
            assert await _status(app, forged) == 401, i
        # Revoking the token on the restarted Mixer ends the sessions it opened before.
        async with _client(app, token=TOKEN) as admin:
            assert (await admin.delete("/api/v1/auth/tokens/ops")).status_code == 200
        assert await _status(app, ops_cookie) == 401
    finally:
        db.close()

    # Another node of the cluster: the same cluster.key, its own database.
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "cluster.key", b / "cluster.key")
    services, db = _services(b)
    try:
        assert await _status(create_app(services), cookie) == 200
    finally:
        db.close()
    # A Mixer with another cluster key refuses it.
    services, db = _services(tmp_path / "c")
    try:
        assert await _status(create_app(services), cookie) == 401
    finally:
        db.close()


async def test_a_logout_survives_a_restart(tmp_path):
    services, db = _services(tmp_path)
    app = create_app(services)
    cookie, csrf = await _login(app)
    other, _ = await _login(app)
    async with _client(app, cookie) as c:
        assert (await c.post("/api/v1/auth/logout", headers={CSRF_HEADER: csrf})).status_code == 200
    assert await _status(app, cookie) == 401
    db.close()
    services, db = _services(tmp_path)
    try:
        app = create_app(services)
        assert await _status(app, cookie) == 401
        assert await _status(app, other) == 200  # only that session ended
        assert app.state.auth.sessions.logged_out() == 1
    finally:
        db.close()


async def test_a_used_session_is_resigned_and_outlives_the_idle_time(tmp_path):
    services, db = _services(tmp_path, **{"console.session_idle": 1.0})
    app = create_app(services)
    try:
        cookie, _ = await _login(app)
        current, fresh = cookie, 0
        for _ in range(8):  # 2.4 s of use, more than twice the idle time
            await asyncio.sleep(0.3)
            async with _client(app, current) as browser:  # the cookie a browser holds now
                r = await browser.get("/api/v1/racks")
            assert r.status_code == 200, (fresh, r.text)
            m = re.match(
                rf"{SESSION_COOKIE}=([^;]+);.*HttpOnly.*Max-Age=\d+.*SameSite=strict", r.headers.get("set-cookie", "")
            )
            if m:
                current, fresh = m.group(1), fresh + 1
        assert fresh >= 3, fresh
        await asyncio.sleep(1.1)  # then left alone past the idle time
        async with _client(app, current) as browser:
            r = await browser.get("/api/v1/racks")
        assert r.status_code == 401 and "log in again" in r.json()["error"]
        assert await _status(app, cookie) == 401  # the first cookie is long idle
    finally:
        db.close()


def test_cookies_of_one_key_mean_nothing_to_another():
    class Rec:
        name, role, digest, expires_at = "x", "read", "d" * 64, None

    a, b = SessionStore(key=b"k" * 32), SessionStore(key=b"j" * 32)
    s = a.create(Rec())
    assert a.get(s.id).name == "x" and b.get(s.id) is None
    assert a.get(s.id, now=s.expires_at) is None  # expired
    assert a.get("v1.e30.AAAA") is None and a.get("v2." + s.id[3:]) is None and a.get("x" * 5000) is None


async def test_docs_are_served_by_the_mixer_itself(tmp_path):
    services, db = _services(tmp_path)
    app = create_app(services)
    try:
        async with _client(app) as anon:
            assert (await anon.get("/docs")).status_code == 401
        async with _client(app, token=TOKEN) as c:
            r = await c.get("/docs")
            assert r.status_code == 200 and r.headers["content-security-policy"] == DOCS_CSP
            page = r.text
            urls = re.findall(r'(?:src|href)="([^"]+)"', page)
            assert urls and all(u.startswith("/docs/static/") for u in urls), urls
            assert "<script>" not in page  # no inline script: script-src stays 'self'
            assert "cdn" not in page.lower() and "http" not in page.lower()
        async with _client(app) as anon:
            for url in urls:
                r = await anon.get(url)
                assert r.status_code == 200 and len(r.content) > 100, url
                assert "immutable" in r.headers["cache-control"]
                assert r.headers["content-security-policy"] == DOCS_CSP
            js = (await anon.get("/docs/static/swagger-ui-bundle.js")).text
            assert "SwaggerUIBundle" in js
            assert (await anon.get("/docs/static/../auth.py")).status_code == 404
            assert (await anon.get("/docs/static/index.html")).status_code == 404
        assert set(DOCS_FILES) == {u.split("/")[-1].split("?")[0] for u in urls}
    finally:
        db.close()
