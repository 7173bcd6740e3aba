"""The console's server side (api/routes_console.py, api/feed.py) over a real Mixer (real
nats-server child, real DuckDB, the real uvicorn server on a free loopback port): the static
files and their headers, the server-sent event feed (snapshot, changes, one Rack, the log
tail, a bad filter), the Rack graph, the gear-rate series and the scenario check with the
lines its problems name. The browser suite (test_console_browser.py) drives the same pages."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
from fluxrig_mixer.api.routes_console import CONSOLE_CSP, locate
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import make_mixer

SCENARIO = """\
meta: {name: graph-test, version: 2.0.0}
racks:
  - name: edge-a
  - name: edge-b
gears:
  - name: src
    type: generator
    deploy: edge-a
    config: {interval: 1s, count: 1}
  - name: shout
    type: map
    deploy: edge-a
    config:
      ops: [{set: raw, value: "x"}]
  - name: sinkb
    type: sink
    deploy: edge-b
    config: {mode: "null"}
wires:
  - {from: src.out, to: shout.in}
  - {from: shout.out, to: edge-b.sinkb.in}
"""


def _nkey() -> str:
    """A fresh Rack bus identity (its public NKey), as a Hello brings it."""
    from fluxrig.wire import identity

    return identity.public_key(identity.new_user_seed())


class Sse:
    """Reads server-sent events off one streaming response (one line iterator for its life)."""

    def __init__(self, resp):
        self.lines = resp.aiter_lines()

    async def next(self, n: int = 1, timeout: float = 5.0) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        name, data = None, []

        async def read():
            nonlocal name, data
            async for line in self.lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line == "" and name:
                    out.append((name, json.loads("".join(data))))
                    name, data = None, []
                    if len(out) == n:
                        return

        await asyncio.wait_for(read(), timeout)
        return out


async def test_static_files_need_no_token_and_are_locked_down(mixer):
    async with httpx.AsyncClient(base_url=mixer.api_url, timeout=10) as anon:
        r = await anon.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/console"
        page = await anon.get("/console")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONSOLE_CSP
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
        js = re.search(r'src="(/console/console\.js\?v=([0-9a-f]+))"', page.text)
        r = await anon.get(js.group(1))
        assert r.status_code == 200 and "immutable" in r.headers["cache-control"]
        assert "https://" not in r.text and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
        r = await anon.get("/console/console.js", headers={"If-None-Match": f'"{js.group(2)}"'})
        assert r.status_code == 304 and r.headers["cache-control"] == "no-cache"
        for bad in ("/console/../app.py", "/console/auth.py", "/console/%2e%2e%2fapp.py", "/console/x.js"):
            assert (await anon.get(bad)).status_code == 404, bad
        for data in ("/api/v1/events", "/api/v1/console/racks/x/graph", "/api/v1/console/series?rack=x"):
            assert (await anon.get(data)).status_code == 401, data


async def test_feed_sends_a_snapshot_then_changes_and_ends_on_stop(tmp_path):
    m = await make_mixer(tmp_path / "m", **{"console.feed_interval": 0.1, "enrollment.heartbeat_interval": 60.0})
    stopped = False
    try:
        first = await m.controller.state.create("edge-1", host="h1", adopted=True, nkey=_nkey())
        headers = {"Authorization": f"Bearer {m.api_token}"}
        async with httpx.AsyncClient(base_url=m.api_url, headers=headers, timeout=10) as api:
            r = await api.get("/api/v1/events", params={"logs": 1, "min_level": "loud"})
            assert r.status_code == 400 and "min_level" in r.json()["error"]
            assert (await api.get("/api/v1/events", params={"rack": "nope"})).status_code == 404
            async with api.stream("GET", "/api/v1/events") as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                sse = Sse(resp)
                [(name, rows)] = await sse.next()
                assert name == "fleet" and [r["name"] for r in rows] == ["edge-1"]
                assert rows[0]["status"] == "active" and rows[0]["killed"] is False
                await m.controller.state.create("edge-2", adopted=True, nkey=_nkey())
                [(name, change)] = await sse.next()
                assert name == "racks" and [r["name"] for r in change["changed"]] == ["edge-2"]
                assert change["gone"] == []
                m.registry.update_info(first.rack_id, stats={"ctrl": {"killed": True, "reason": "drill"}})
                [(name, change)] = await sse.next()
                assert [(r["name"], r["killed"], r["kill_reason"]) for r in change["changed"]] == [
                    ("edge-1", True, "drill")
                ]
            async with api.stream("GET", "/api/v1/events", params={"rack": "edge-1"}) as resp:
                got = dict(await Sse(resp).next(2))
                assert got["rack"]["name"] == "edge-1" and got["rack"]["stats"]["ctrl"]["killed"] is True
                assert got["rack"]["events"][0]["event"] == "enroll_adopted"
                # Stopping the Mixer ends the stream at once (no 5 s wait for the API server).
                t0 = time.monotonic()
                await m.stop()
                stopped = True
                assert time.monotonic() - t0 < 4.0
    finally:
        if not stopped:
            await m.stop()


async def test_graph_series_and_check(mixer, api):
    await mixer.controller.state.create("edge-a", adopted=True, nkey=_nkey())
    await mixer.controller.state.create("edge-b", adopted=True, nkey=_nkey())
    r = await api.post("/api/v1/scenarios/import", params={"activate": "true"}, content=SCENARIO.encode())
    assert r.status_code == 200, r.text
    g = (await api.get("/api/v1/console/racks/edge-a/graph")).json()
    gears = {x["name"]: x for x in g["gears"]}
    assert set(gears) == {"src", "shout"} and gears["shout"]["type"] == "map"
    assert "in" in gears["shout"]["inputs"] and {"out", "error"} <= set(gears["shout"]["outputs"])
    assert g["wires"] == [{"from": "src", "from_port": "out", "to": "shout", "to_port": "in"}]
    assert [(w["gear"], w["port"], w["direction"], w["peer"]) for w in g["remote"]] == [
        ("shout", "out", "out", "edge-b.sinkb.in")
    ]
    b = (await api.get("/api/v1/console/racks/edge-b/graph")).json()
    assert [x["name"] for x in b["gears"]] == ["sinkb"] and b["remote"][0]["direction"] == "in"
    assert (await api.get("/api/v1/console/racks/nope/graph")).status_code == 404

    s = (await api.get("/api/v1/console/series", params={"rack": "edge-a", "since": "15m", "bucket": "10s"})).json()
    assert s["series"] == ["messages_in", "messages_out", "errors"] and s["points"] == []
    assert (await api.get("/api/v1/console/series", params={"rack": "edge-a", "bucket": "0.1s"})).status_code == 400
    r = await api.get("/api/v1/console/series", params={"rack": "edge-a", "since": "yesterday-ish"})
    assert r.status_code == 400 and r.json()["error"].startswith("since:")

    bad = SCENARIO.replace("to: shout.in", "to: nobody.in").replace('mode: "null"', "mode: loud")
    out = (await api.post("/api/v1/console/check", content=bad.encode())).json()
    assert out["valid"] is False
    lines = bad.splitlines()
    by_loc = {p["location"]: p["line"] for p in out["problems"]}
    wire_line = 1 + next(i for i, ln in enumerate(lines) if "nobody.in" in ln)
    mode_line = 1 + next(i for i, ln in enumerate(lines) if "loud" in ln)
    assert by_loc["wires[0].to"] == wire_line, out
    assert any(loc.startswith("gears[2]") and line == mode_line for loc, line in by_loc.items()), out
    out = (await api.post("/api/v1/console/check", content=b"meta: [1\n")).json()
    assert out["valid"] is False and out["problems"][0]["line"] == 2
    out = (await api.post("/api/v1/console/check", content=SCENARIO.encode())).json()
    assert out["valid"] is True and out["version"] == "2.0.0"
    assert (await api.get("/api/v1/scenarios")).json()[0]["version"].startswith("2.0.0@")  # check stored nothing new
    assert len((await api.get("/api/v1/scenarios")).json()) == 1


def test_locate_names_toml_keys_and_rack_prefixes():
    toml = '[meta]\nname = "x"\nversion = "1"\n\n[[gears]]\nname = "a"\ntype = "map"\n'
    assert locate(toml, "toml", "gears[0](a).type") == 7
    assert locate("gears:\n  - name: a\n    type: map\n", "yaml", "edge-1: gears[0](a).type") == 3
    assert locate("a: 1\n", "yaml", "nothing.here") is None


async def test_open_streams_take_no_request_slot(tmp_path):
    """The guard caps requests in flight (api.max_requests); consoles keep a stream open all
    day, so streams are not counted there (the feed caps them itself)."""
    m = await make_mixer(tmp_path / "m", **{"api.max_requests": 2, "enrollment.heartbeat_interval": 60.0})
    try:
        headers = {"Authorization": f"Bearer {m.api_token}"}
        async with httpx.AsyncClient(base_url=m.api_url, headers=headers, timeout=10) as api:
            streams = [api.stream("GET", "/api/v1/events") for _ in range(3)]
            opened = [await s.__aenter__() for s in streams]
            try:
                for resp in opened:
                    [(name, _)] = await Sse(resp).next()
                    assert name == "fleet"
                assert (await api.get("/api/v1/racks")).status_code == 200
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)
    finally:
        await m.stop()
