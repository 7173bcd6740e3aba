"""The guaranteed lane over JetStream, end to end: a real Mixer (nats-server child, DuckDB),
real Rack objects (agent, lane WAL, JetStreamBus, runtime) on loopback.

Rack `edge` runs a generator wired to a file sink on Rack `hub`; the sink's JSON lines are
the evidence (every flux id once, raw `m1..mN` in order). Faults: the Snake SIGKILLed mid-stream,
the hub stopped and restarted mid-stream, the edge cut off from the Snake by a TCP proxy (its
messages wait in its lane WAL). Also scenarios/serial-to-mixer.yaml with a pty as the device.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from mixer_fixtures import make_mixer, snake_toml, wait_for

from fluxrig.agent.session import SessionState
from fluxrig.config import load_config
from fluxrig.rack import Rack
from fluxrig.wire import subjects as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(60)

LANE = """
meta: {{name: lane, version: "{version}"}}
racks: [{{name: edge}}, {{name: hub}}]
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: {count}, interval: {interval}, template: {{raw: "m{{{{ seq }}}}"}}}}}}
  - {{name: store, type: sink, deploy: hub, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: store.in}}
"""


class TcpProxy:
    """A loopback TCP relay the test can cut and restore: a network partition of one Rack."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.server = None
        self.writers: set = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def restore(self) -> None:
        await self.start()


def rack_config(tmp_path, name: str, url: str, mixer):
    state = tmp_path / f"rack-{name}"
    conf = tmp_path / f"{name}.toml"
    conf.write_text(  # store.wal_fsync stays the default (batch): the lane WAL runs it as always
        f'[base]\nname = "{name}"\nstate_dir = "{state}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "3s"\n'
        f"[telemetry]\ndisabled = true\n" + snake_toml(mixer, url=url) + 'reconnect_wait = "200ms"\n'
    )
    return load_config(str(conf), environ={})


class RackRunner:
    def __init__(self, config):
        self.config = config
        self.rack = None
        self.task = None

    async def start(self) -> Rack:
        self.rack = Rack(self.config)
        self.task = asyncio.get_running_loop().create_task(self.rack.run())
        await wait_for(
            lambda: (
                self.task.done()
                # Usable, not necessarily "active": on a loaded box the Mixer may have signed the
                # passport while the Rack was briefly silent ("offline", which carries traffic).
                or (self.rack.agent and self.rack.agent.state is SessionState.USABLE)
            ),
            timeout=15,
            what=f"rack {self.config.base.name} usable",
        )
        if self.task.done():
            self.task.result()
        return self.rack

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.rack.request_stop()
            await asyncio.wait_for(self.task, 20)
        self.task = None


def sink_lines(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


async def activate(mixer, text: str, racks: list[RackRunner]) -> str:
    stored, _ = mixer.scenarios.import_text(text)
    await mixer.controller.activate_scenario(stored)
    for r in racks:
        await wait_for(
            lambda r=r: r.rack.agent.applied_version == stored.version, timeout=15, what=f"{r.config.base.name} applied"
        )
        assert r.rack.agent.apply_state == "applied", r.rack.agent.apply_reason
    return stored.version


def assert_once(lines, count: int, ordered: bool = True) -> None:
    ids = [line["id"] for line in lines]
    raws = [line["raw"] for line in lines]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} messages doubled"
    want = [f"m{i}" for i in range(1, count + 1)]
    assert sorted(raws, key=lambda r: int(r[1:])) == want, f"lost: {sorted(set(want) - set(raws))[:10]}"
    if ordered:
        assert raws == want, "out of order"


async def wait_all(out, n: int, timeout: float, what: str) -> None:
    """wait_for every line at the sink; on a timeout say whether the lane was slow (an
    ordered prefix) or a message is missing behind newer ones (waiting out an ack_wait)."""
    try:
        await wait_for(lambda: len(sink_lines(out)) >= n, timeout=timeout, what=what)
    except AssertionError as exc:
        raws = [int(line["raw"][1:]) for line in sink_lines(out)]
        gaps = [(raws[i - 1], raws[i]) for i in range(1, len(raws)) if raws[i] != raws[i - 1] + 1]
        raise AssertionError(f"{exc}: {len(raws)} of {n} at the sink, jumps {gaps[:5]}") from None


@pytest.fixture
async def snake_mixer(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True, "snake.restart_backoff": 1.0})
    try:
        yield m
    finally:
        await m.stop()


@pytest.fixture
async def two_racks(tmp_path, snake_mixer):
    runners = [RackRunner(rack_config(tmp_path, n, snake_mixer.snake.url, snake_mixer)) for n in ("edge", "hub")]
    try:
        for r in runners:
            await r.start()
        yield runners
    finally:
        for r in runners:
            await r.stop()


async def test_every_message_once_and_in_order(tmp_path, snake_mixer, two_racks):
    edge, hub = two_racks
    out = tmp_path / "store.jsonl"
    n = 400
    await activate(snake_mixer, LANE.format(version=1, count=n, interval="1ms", path=out), [edge, hub])
    info = await snake_mixer.js.consumer_info(S.STREAM_MSG, "in-hub")
    assert (info.config.filter_subjects or [info.config.filter_subject]) == ["flux.msg.edge.gen.out"]
    await wait_for(lambda: len(sink_lines(out)) >= n, timeout=20, what="all messages at the hub")
    await asyncio.sleep(0.3)
    assert_once(sink_lines(out), n)
    await wait_for(lambda: edge.rack.bus.metrics()["backlog_records"] == 0, what="edge lane WAL drained")
    em, hm = edge.rack.bus.metrics(), hub.rack.bus.metrics()
    assert em["published"] == n and em["publish_failures"] == 0
    assert hm["delivered"] == n and hm["stale_acked"] == 0
    await wait_for(lambda: hub.rack.bus.metrics()["acked"] >= n, what="hub acked all")
    # The consumer holds nothing unacknowledged.
    info = await snake_mixer.js.consumer_info(S.STREAM_MSG, "in-hub")
    assert info.num_ack_pending == 0 and info.num_pending == 0

    # A scenario without the cross-Rack wire removes the consumer.
    stored, _ = snake_mixer.scenarios.import_text(
        'meta: {name: lane, version: "2"}\nracks: [{name: edge}, {name: hub}]\n'
        'gears:\n  - {name: store, type: sink, deploy: hub, config: {mode: "null"}}\n'
    )
    await snake_mixer.controller.activate_scenario(stored)
    names = [c.name for c in await snake_mixer.js.consumers_info(S.STREAM_MSG)]
    assert "in-hub" not in names


async def test_snake_killed_mid_stream_nothing_lost_nothing_doubled(tmp_path, snake_mixer, two_racks):
    edge, hub = two_racks
    out = tmp_path / "store.jsonl"
    n = 1500
    await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
    await wait_for(lambda: len(sink_lines(out)) >= 200, timeout=15, what="traffic flowing")
    snake_mixer.snake._proc.kill()  # SIGKILL: the supervisor restarts it after its backoff
    await wait_for(lambda: not edge.rack.agent.connected.is_set(), timeout=5, what="edge sees the Snake gone")
    # Offline: the generator keeps going, its messages wait in the lane WAL.
    await wait_for(lambda: edge.rack.bus.metrics()["backlog_records"] >= 50, timeout=5, what="a backlog in the WAL")
    await wait_for(lambda: len(sink_lines(out)) >= n, timeout=40, what="all messages after the restart")
    await asyncio.sleep(0.5)
    assert snake_mixer.snake.restarts >= 1
    assert_once(sink_lines(out), n, ordered=False)


async def test_hub_restarted_mid_stream(tmp_path, snake_mixer, two_racks):
    edge, hub = two_racks
    out = tmp_path / "store.jsonl"
    n = 1000
    await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
    await wait_for(lambda: len(sink_lines(out)) >= 150, timeout=15, what="traffic flowing")
    await hub.stop()
    stopped_at = len(sink_lines(out))
    await asyncio.sleep(0.5)  # the edge keeps publishing; JetStream holds it for the hub
    assert len(sink_lines(out)) == stopped_at
    await hub.start()
    await wait_all(out, n, timeout=30, what="the rest after the hub restarted")
    await asyncio.sleep(0.3)
    assert_once(sink_lines(out), n)
    assert hub.rack.bus.metrics()["out_of_order"] == 0


@pytest.mark.timeout(120)
async def test_hub_slow_to_close_gives_back_what_the_snake_still_delivers(tmp_path, snake_mixer, two_racks):
    """The hub stops while the edge keeps sending, and its connection closes 1.5 s after its
    lane stopped fetching. The pull request of its last fetch lives on at the Snake meanwhile
    and delivers newer messages; they must go back to JetStream (NAKed in order), not wait
    for the consumer's ack_wait (30 s) and come back behind newer ones after the restart (the
    wait below outlasts ack_wait, so such a message shows as out of order, however slow the box)."""
    edge, hub = two_racks
    out = tmp_path / "store.jsonl"
    n = 600
    await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
    await wait_for(lambda: len(sink_lines(out)) >= 150, timeout=15, what="traffic flowing")
    agent = hub.rack.link.agent
    real_stop = agent.stop

    async def slow_stop():
        await asyncio.sleep(1.5)
        await real_stop()

    agent.stop = slow_stop
    await hub.stop()
    await hub.start()
    await wait_all(out, n, timeout=45, what="the rest after the hub restarted")
    await asyncio.sleep(0.3)
    assert_once(sink_lines(out), n)
    assert hub.rack.bus.metrics()["out_of_order"] == 0


async def test_edge_cut_off_waits_in_its_wal_and_flows_on_rejoin(tmp_path, snake_mixer):
    proxy = TcpProxy(snake_mixer.snake.port)
    await proxy.start()
    edge = RackRunner(rack_config(tmp_path, "edge", f"tls://127.0.0.1:{proxy.port}", snake_mixer))
    hub = RackRunner(rack_config(tmp_path, "hub", snake_mixer.snake.url, snake_mixer))
    out = tmp_path / "store.jsonl"
    n = 800
    try:
        await edge.start()
        await hub.start()
        await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= 100, timeout=15, what="traffic flowing")
        await proxy.cut()
        await wait_for(lambda: not edge.rack.agent.connected.is_set(), timeout=5, what="edge offline")
        await asyncio.sleep(1.0)
        backlog = edge.rack.bus.metrics()["backlog_records"]
        assert backlog >= 100, backlog  # still generating, nothing lost: waiting in the lane WAL
        before = len(sink_lines(out))
        await asyncio.sleep(0.3)
        assert len(sink_lines(out)) == before  # the hub gets nothing while the edge is away
        await proxy.restore()
        await wait_for(lambda: len(sink_lines(out)) >= n, timeout=30, what="the backlog after rejoining")
        await asyncio.sleep(0.3)
        assert_once(sink_lines(out), n, ordered=False)
    finally:
        await edge.stop()
        await hub.stop()
        await proxy.cut()


async def test_edge_stopped_while_cut_off_ships_its_wal_after_restart(tmp_path, snake_mixer):
    """Records written to the lane WAL while offline survive the Rack's restart: the next
    incarnation (starting offline from its stored passport) publishes them when it rejoins."""
    proxy = TcpProxy(snake_mixer.snake.port)
    await proxy.start()
    edge = RackRunner(rack_config(tmp_path, "edge", f"tls://127.0.0.1:{proxy.port}", snake_mixer))
    hub = RackRunner(rack_config(tmp_path, "hub", snake_mixer.snake.url, snake_mixer))
    out = tmp_path / "store.jsonl"
    n = 300
    try:
        await edge.start()
        await hub.start()
        await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= 50, timeout=15, what="traffic flowing")
        await proxy.cut()
        gen = edge.rack.runtime.gears["gen"]
        await wait_for(lambda: edge.rack.bus.metrics()["backlog_records"] >= 100, timeout=10, what="an offline backlog")
        await edge.stop()  # SIGTERM-like: drains, closes the lane WAL with its backlog inside
        first_run = gen.counters.messages_out
        assert 0 < len(sink_lines(out)) < first_run
        await proxy.restore()
        await edge.start()  # applies its stored passport at once: the generator runs again (n more)
        await wait_for(lambda: len(sink_lines(out)) >= first_run + n, timeout=30, what="both runs at the hub")
        await asyncio.sleep(0.3)
        lines = sink_lines(out)
        assert len(lines) == first_run + n and len({line["id"] for line in lines}) == len(lines)
        raws = sorted(int(line["raw"][1:]) for line in lines)
        assert raws == sorted(list(range(1, first_run + 1)) + list(range(1, n + 1)))
    finally:
        await edge.stop()
        await hub.stop()
        await proxy.cut()


async def test_serial_to_mixer_scenario_with_a_pty(tmp_path, snake_mixer, monkeypatch):
    """scenarios/serial-to-mixer.yaml as shipped: a pty plays the field device on Rack
    `field-gw`; every frame lands once, in order, stamped, in the hub's JSON-lines store."""
    from serial_pty import PtyDevice

    link = tmp_path / "ttyFIELD"
    out = tmp_path / "frames.jsonl"
    monkeypatch.setenv("FLUXRIG_SERIAL_PORT", str(link))
    monkeypatch.setenv("FLUXRIG_STORE_PATH", str(out))
    monkeypatch.setenv("FLUXRIG_SITE", "site-7")
    device = PtyDevice(link)
    gw = RackRunner(rack_config(tmp_path, "field-gw", snake_mixer.snake.url, snake_mixer))
    hub = RackRunner(rack_config(tmp_path, "hub", snake_mixer.snake.url, snake_mixer))
    try:
        await gw.start()
        await hub.start()
        with open(os.path.join(ROOT, "scenarios", "serial-to-mixer.yaml"), encoding="utf-8") as fh:
            await activate(snake_mixer, fh.read(), [gw, hub])
        info = await snake_mixer.js.consumer_info(S.STREAM_MSG, "in-hub")
        assert sorted(info.config.filter_subjects or [info.config.filter_subject]) == [
            "flux.msg.field-gw.meter.error",
            "flux.msg.field-gw.stamp.out",
        ]
        meter = gw.rack.runtime.gears["meter"]
        await wait_for(lambda: meter.link is not None, timeout=5, what="io_serial opened the pty")
        n = 200
        for i in range(1, n + 1):
            await device.write(f"reading {i}\r\n".encode())
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await wait_for(lambda: len(sink_lines(out)) >= n, timeout=20, what="every frame in the central store")
        await asyncio.sleep(0.3)
        lines = sink_lines(out)
        assert [line["raw"] for line in lines] == [f"reading {i}" for i in range(1, n + 1)]
        assert len({line["id"] for line in lines}) == n
        assert all(line["meta"]["site"] == "site-7" and line["meta"]["flux.source"] == "io_serial" for line in lines)
    finally:
        await gw.stop()
        await hub.stop()
        device.close()


TAPPED = """
meta: {{name: lane, version: "2"}}
racks: [{{name: edge}}, {{name: hub}}]
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: {count}, interval: {interval}, template: {{raw: "m{{{{ seq }}}}"}}}}}}
  - {{name: tap, type: map, deploy: hub, config: {{ops: [{{set: meta.tapped, value: "yes"}}]}}}}
  - {{name: store, type: sink, deploy: hub, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: tap.in}}
  - {{from: tap.out, to: store.in}}
"""


async def test_reload_rewiring_the_receiving_side_mid_stream(tmp_path, snake_mixer, two_racks):
    """A new version puts a map between the wire and the hub's sink while the edge keeps
    sending: the subject now feeds tap.in (a new input) instead of store.in (retired). No
    message may reach both, none may be lost; after the swap every message is tapped."""
    edge, hub = two_racks
    out = tmp_path / "store.jsonl"
    n = 800
    await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
    await wait_for(lambda: len(sink_lines(out)) >= 150, timeout=15, what="traffic flowing")
    stored, _ = snake_mixer.scenarios.import_text(TAPPED.format(count=n, interval="2ms", path=out))
    await snake_mixer.controller.activate_scenario(stored)
    await wait_for(lambda: hub.rack.agent.applied_version == stored.version, timeout=10, what="hub reloaded")
    assert hub.rack.agent.apply_state == "applied", hub.rack.agent.apply_reason
    assert edge.rack.runtime.gears["gen"].state == "started"  # unchanged on the edge: kept, still sending
    await wait_for(lambda: len(sink_lines(out)) >= n, timeout=30, what="every message across the reload")
    await asyncio.sleep(0.3)
    lines = sink_lines(out)
    assert_once(lines, n, ordered=False)
    tapped = [line["meta"].get("tapped") == "yes" for line in lines]
    assert 0 < tapped.index(True) and all(tapped[tapped.index(True) :])  # one cut-over, then all tapped
    assert hub.rack.bus.metrics()["stale_acked"] == 0


async def test_killed_receiving_gear_holds_its_messages_in_jetstream_until_revived(tmp_path, snake_mixer, two_racks):
    """The kill switch stops the hub's sink mid-stream: what the lane still held for it goes
    back to JetStream, nothing is fetched for it meanwhile, and after the revive every message
    arrives once."""
    edge, hub = two_racks
    out = tmp_path / "store.jsonl"
    n = 600
    await activate(snake_mixer, LANE.format(version=1, count=n, interval="2ms", path=out), [edge, hub])
    await wait_for(lambda: len(sink_lines(out)) >= 100, timeout=15, what="traffic flowing")
    assert await hub.rack.stop_gear("store")
    killed_at = len(sink_lines(out))
    await asyncio.sleep(0.7)
    assert len(sink_lines(out)) == killed_at
    info = await snake_mixer.js.consumer_info(S.STREAM_MSG, "in-hub")
    assert info.num_pending + info.num_ack_pending > 0  # waiting in the Snake, not dropped
    await hub.rack.revive_gears()
    await wait_for(lambda: len(sink_lines(out)) >= n, timeout=30, what="every message after the revive")
    await asyncio.sleep(0.3)
    assert_once(sink_lines(out), n, ordered=False)
    assert hub.rack.bus.metrics()["stale_acked"] == 0


SLOW = """
meta: {{name: lane, version: "1"}}
racks: [{{name: edge}}, {{name: hub}}]
gears:
  - {{name: gen, type: generator, deploy: edge,
     config: {{count: {count}, interval: 1ms, template: {{raw: "m{{{{ seq }}}}"}}}}}}
  - {{name: store, type: test_serial_catch, deploy: hub, config: {{delay: 0.005}}}}
wires:
  - {{from: gen.out, to: store.in}}
"""


async def test_rack_killed_while_a_slow_gear_is_busy_then_revived(tmp_path, snake_mixer, two_racks):
    """Kill switch on the whole hub while its slow gear is mid-message with a full queue: the
    message being processed and everything queued go back to JetStream (none stays stuck as
    'in progress'), and after the revive each message is processed once."""
    import serial_pty  # noqa: F401  registers test_serial_catch (a collector with a delay)

    edge, hub = two_racks
    n = 300
    text = SLOW.format(count=n)
    await activate(snake_mixer, text, [edge, hub])
    first = hub.rack.runtime.gears["store"]
    await wait_for(lambda: len(first.got["in"]) >= 50, timeout=15, what="the slow gear busy")
    await hub.rack.kill_gears("test")
    await asyncio.sleep(0.3)
    await hub.rack.revive_gears()
    await wait_for(
        lambda: "store" in hub.rack.runtime.gears and hub.rack.runtime.gears["store"] is not first,
        timeout=10,
        what="revived",
    )
    second = hub.rack.runtime.gears["store"]
    await wait_for(lambda: len(first.got["in"]) + len(second.got["in"]) >= n, timeout=30, what="every message")
    await asyncio.sleep(0.3)
    raws = [m.raw.decode() for m in first.got["in"] + second.got["in"]]
    ids = [m.id for m in first.got["in"] + second.got["in"]]
    assert len(ids) == len(set(ids)) == n
    assert sorted(raws, key=lambda r: int(r[1:])) == [f"m{i}" for i in range(1, n + 1)]
    m = hub.rack.bus.metrics()
    assert m["working"] == 0 and m["given_back"] >= 1, m
