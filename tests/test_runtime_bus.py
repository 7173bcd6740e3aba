"""Cross-Rack and guaranteed wires go through the bus contract (here the in-memory bus)."""

import asyncio

import pytest
from helpers import free_port, scenario_from_yaml

from fluxrig.errors import FluxError
from fluxrig.runtime import Runtime
from fluxrig.runtime.bus import MemoryBus, dedup_id
from fluxrig.wire import meta as M

TWO_RACKS = """
meta: {version: '1'}
racks: [{name: edge}, {name: hub}]
gears:
  - {name: gen, type: generator, deploy: edge, config: {count: 5, interval: 10ms, template: {raw: "m{{ seq }}"}}}
  - {name: store, type: test_collect, deploy: hub}
wires:
  - {from: gen.out, to: store.in}
"""


async def test_a_wire_between_two_racks_crosses_the_bus():
    import test_gears_logic

    test_gears_logic.OUT.clear()
    bus = MemoryBus()
    scenario = scenario_from_yaml(TWO_RACKS)
    hub = Runtime(scenario, rack_name="hub", bus=bus)
    edge = Runtime(scenario, rack_name="edge", bus=bus)
    await hub.start()
    await edge.start()
    try:
        assert set(edge.gears) == {"gen"} and set(hub.gears) == {"store"}
        await asyncio.wait_for(edge.gears["gen"].done.wait(), 5)
        for _ in range(100):
            if len(test_gears_logic.OUT) == 5:
                break
            await asyncio.sleep(0.01)
        assert [m.raw for _, _, m in test_gears_logic.OUT] == [b"m1", b"m2", b"m3", b"m4", b"m5"]
        assert bus.sources["flux.msg.edge.gen.out"][0].consumer == "hub.store.in.gen.out"
    finally:
        await edge.shutdown(1)
        await hub.shutdown(1)


async def test_standalone_rack_refuses_a_cross_rack_wire_clearly():
    rt = Runtime(scenario_from_yaml(TWO_RACKS), rack_name="edge")
    with pytest.raises(FluxError, match=r"needs the guaranteed lane.*join this Rack to a Mixer"):
        rt.build()


def test_dedup_id_names_message_hops_and_subject():
    from fluxrig.msg import FluxMsg

    m = FluxMsg()
    m.hop(b"g", b"p")
    assert dedup_id(m, "flux.msg.a.b.c") == f"{m.id.hex()}-1-flux.msg.a.b.c"


class _BatchCountingBus(MemoryBus):
    """The in-memory bus whose outbound targets batch (as the lane's do), noting the size of
    every batch one is handed."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def outbound(self, subject):
        target = super().outbound(subject)
        inner = target.put_many

        async def put_many(msgs):
            self.batches.append(len(msgs))
            await inner(msgs)

        target.put_many = put_many
        target.batches = True
        return target


async def test_pipelined_tcp_frames_reach_a_guaranteed_wire_in_batches_and_in_order():
    """The frames of one TCP read go to a bus outbound together (one WAL commit for them on a
    joined Rack) instead of one awaited put each, and arrive in the order the peer sent them."""
    import test_gears_logic

    test_gears_logic.OUT.clear()
    port = free_port()
    scenario = scenario_from_yaml(f"""
meta: {{version: '1'}}
racks: [{{name: edge}}, {{name: hub}}]
gears:
  - {{name: gw, type: io_tcp, deploy: edge, config: {{mode: server, bind: "127.0.0.1:{port}", framing: delimiter}}}}
  - {{name: store, type: test_collect, deploy: hub}}
wires:
  - {{from: gw.out, to: store.in}}
""")
    bus = _BatchCountingBus()
    hub = Runtime(scenario, rack_name="hub", bus=bus)
    edge = Runtime(scenario, rack_name="edge", bus=bus)
    await hub.start()
    await edge.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(b"line-%d\n" % i for i in range(300)))
        await writer.drain()
        for _ in range(500):
            if len(test_gears_logic.OUT) == 300:
                break
            await asyncio.sleep(0.01)
        got = [m for _, _, m in test_gears_logic.OUT]
        assert [m.raw for m in got] == [b"line-%d" % i for i in range(300)]
        assert len({m.meta[M.CONN_ID] for m in got}) == 1
        assert sum(bus.batches) >= 250 and max(bus.batches) > 1, bus.batches
        assert max(bus.batches) <= 64  # fluxrig.net.tcp.FRAME_BATCH_MAX
        writer.close()
    finally:
        await edge.shutdown(1)
        await hub.shutdown(1)
