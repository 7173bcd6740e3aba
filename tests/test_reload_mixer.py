"""Reloads from the Mixer keep live connections too (issue 18 item 5; SIGHUP: the bench test
in test_reload_handover). A real Mixer (nats-server child, DuckDB) and a real Rack object on
loopback: the Mixer activates versions that rebuild the Rack's tcp-echo server gear (its
idle_timeout) and map while 8 clients keep lines in flight. No client is cut, every line is
answered once and in order, by either version, and the reload reports reach the Rack's log.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import free_port
from mixer_fixtures import wait_for
from test_mixer_lanes import RackRunner, activate, rack_config, snake_mixer  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(90)

CLIENTS = 8
RELOADS = 6

ECHO = """
meta: {{name: echo, version: "{version}"}}
racks: [{{name: edge}}]
gears:
  - name: gw
    type: io_tcp
    deploy: edge
    config: {{mode: server, bind: "127.0.0.1:{port}", delimiter_append: true, idle_timeout: {idle}m}}
  - name: xf
    type: map
    deploy: edge
    config: {{ops: [{{set: raw, value: "{tag}:{{{{ raw }}}}"}}]}}
wires:
  - {{from: gw.out, to: xf.in}}
  - {{from: xf.out, to: gw.in}}
"""


@pytest.fixture
async def edge(tmp_path, snake_mixer):  # noqa: F811
    runner = RackRunner(rack_config(tmp_path, "edge", snake_mixer.snake.url, snake_mixer))
    try:
        await runner.start()
        yield runner
    finally:
        await runner.stop()


async def test_mixer_reloads_rebuilding_the_server_gear_cut_no_client(snake_mixer, edge):  # noqa: F811
    port = free_port()
    await activate(snake_mixer, ECHO.format(version="1", port=port, idle=5, tag="A"), [edge])
    stop = asyncio.Event()
    counts = [0] * CLIENTS

    async def client(i):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sent = got = 0
        try:
            while not stop.is_set() or got < sent:
                while sent - got < 8 and not stop.is_set():
                    w.write(b"c%d-%d\n" % (i, sent))
                    sent += 1
                line = (await asyncio.wait_for(r.readline(), 10)).rstrip(b"\n")
                tag, _, body = line.partition(b":")
                assert tag in (b"A", b"B") and body == b"c%d-%d" % (i, got), line
                got += 1
            counts[i] = got
        finally:
            w.close()

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    try:
        await asyncio.sleep(0.2)
        runtime = edge.rack.runtime
        first = runtime.gears["gw"]
        for n in range(2, RELOADS + 2):
            text = ECHO.format(version=str(n), port=port, idle=5 + n, tag="B" if n % 2 else "A")
            await activate(snake_mixer, text, [edge])
            await wait_for(lambda n=n: runtime.gears["gw"].config["idle_timeout"] == f"{5 + n}m", what=f"v{n} running")
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
    gw = edge.rack.runtime.gears["gw"]
    assert gw is not first and all(c > 0 for c in counts)
    m = gw.metrics()
    assert m["connections_total"] == 0 and m["connections_adopted"] == CLIENTS  # nobody reconnected
