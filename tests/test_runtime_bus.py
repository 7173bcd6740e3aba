"""Cross-Rack and guaranteed wires go through the bus contract (here the in-memory bus)."""

import asyncio

import pytest
from helpers import scenario_from_yaml

from fluxrig.errors import FluxError
from fluxrig.runtime import Runtime
from fluxrig.runtime.bus import MemoryBus, dedup_id

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
