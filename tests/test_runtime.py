"""The runtime: fused chains, fan-out copies, fan-in merge, error port, backpressure, rollback."""

import asyncio

import pytest
from helpers import running, scenario_from_yaml

from fluxrig.errors import GearError
from fluxrig.msg import FluxMsg
from fluxrig.runtime import (
    Gear,
    GearEvent,
    GearStartError,
    GearState,
    IllegalTransition,
    Manifest,
    Runtime,
    RuntimeState,
    register,
)
from fluxrig.runtime.lane import DirectTarget, Lane

SEEN: dict[str, list] = {}
BUILT: dict[str, Gear] = {}  # the last gear object built under each name, started or not


@register
class RecorderGear(Gear):
    """Test gear: records what arrives, optionally slowly, optionally failing."""

    MANIFEST = Manifest(
        "test_recorder",
        "records messages (tests only)",
        inputs=("in", "in_b"),
        schema={
            "type": "object",
            "properties": {
                "delay": {"type": "number", "default": 0},
                "fail_on": {"type": "string", "default": ""},
                "fail_start": {"type": "boolean", "default": False},
                "mutate": {"type": "boolean", "default": False},
            },
            "additionalProperties": False,
        },
    )

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        BUILT[name] = self

    async def start(self):
        if self.config["fail_start"]:
            raise RuntimeError("refusing to start (test)")
        SEEN[self.name] = []

    async def process(self, port, msg):
        if self.config["delay"]:
            await asyncio.sleep(self.config["delay"])
        if self.config["fail_on"] and msg.raw == self.config["fail_on"].encode():
            raise GearError("test_failure", "asked to fail")
        if self.config["mutate"]:
            msg.set("touched", self.name)
        SEEN[self.name].append((port, msg))
        await self.emit("out", msg)


@register
class PumpGear(Gear):
    """Test source: emits N messages as fast as the pipeline takes them."""

    MANIFEST = Manifest(
        "test_pump",
        "emits n messages (tests only)",
        inputs=(),
        schema={
            "type": "object",
            "properties": {"n": {"type": "integer", "default": 10}},
            "additionalProperties": False,
        },
    )

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        BUILT[name] = self

    async def start(self):
        self.done = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self):
        for i in range(self.config["n"]):
            await self.emit("out", FluxMsg(raw=str(i).encode()))
        self.done.set_result(None)

    async def stop(self):
        self.task.cancel()


def chain(n=5, extra=""):
    return f"""
meta: {{version: '1'}}
gears:
  - {{name: src, type: test_pump, config: {{n: {n}}}}}
  - {{name: a, type: test_recorder{extra}}}
wires:
  - {{from: src.out, to: a.in}}
"""


async def test_one_to_one_is_fused():
    async with running(chain()) as rt:
        await rt.gears["src"].done
        assert isinstance(rt.gears["src"].outputs["out"].targets[0], DirectTarget)
        assert [m.raw for _, m in SEEN["a"]] == [str(i).encode() for i in range(5)]
        assert rt.gears["a"].counters.messages_in == 5
        assert rt.gears["a"].counters.dropped == 5  # a.out is not wired: counted, not silent


async def test_fan_out_copies_and_fan_in_merges():
    text = """
meta: {version: '1'}
gears:
  - {name: src, type: test_pump, config: {n: 20}}
  - {name: src2, type: test_pump, config: {n: 20}}
  - {name: a, type: test_recorder, config: {mutate: true}}
  - {name: b, type: test_recorder, config: {mutate: true}}
wires:
  - {from: src.out, to: a.in}
  - {from: src.out, to: b.in}
  - {from: src2.out, to: b.in_b}
"""
    async with running(text) as rt:
        await rt.gears["src"].done
        await rt.gears["src2"].done
        await asyncio.gather(*(lane.join() for lane in rt.lanes))
        assert isinstance(rt.gears["src"].outputs["out"].targets[0], Lane)
        assert len(SEEN["a"]) == 20
        assert len(SEEN["b"]) == 40
        a_ids = {id(m) for _, m in SEEN["a"]}
        assert not a_ids & {id(m) for _, m in SEEN["b"]}  # each target got its own copy
        assert all(m.get("touched") == "a" for _, m in SEEN["a"])
        assert all(m.get("touched") == "b" for _, m in SEEN["b"])
        assert sorted(p for p, _ in SEEN["b"]).count("in_b") == 20


async def test_error_port_convention():
    text = """
meta: {version: '1'}
gears:
  - {name: src, type: test_pump, config: {n: 4}}
  - {name: a, type: test_recorder, config: {fail_on: "2"}}
  - {name: errs, type: test_recorder}
wires:
  - {from: src.out, to: a.in}
  - {from: a.error, to: errs.in}
"""
    async with running(text) as rt:
        await rt.gears["src"].done
        assert [m.raw for _, m in SEEN["errs"]] == [b"2"]
        bad = SEEN["errs"][0][1]
        assert bad.meta["error.reason"] == "test_failure"
        assert bad.meta["error.gear"] == "a"
        assert rt.gears["a"].counters.errors == 1
        assert len(SEEN["a"]) == 3


async def test_slow_consumer_slows_producer_nothing_dropped():
    from fluxrig.config import load_config

    cfg = load_config(None, environ={"FLUXRIG_RACK_LANE_QUEUE_SIZE": "4", "FLUXRIG_RACK_FUSE_SYNC_CHAINS": "false"})
    text = chain(30, ", config: {delay: 0.005}")
    loop = asyncio.get_running_loop()
    async with running(text, rack_config=cfg.rack) as rt:
        lane = rt.gears["src"].outputs["out"].targets[0]
        assert isinstance(lane, Lane)
        t0 = loop.time()
        await rt.gears["src"].done
        produced_in = loop.time() - t0
        await lane.join()
        assert lane.max_depth <= 4  # the queue never grew past its bound
        assert produced_in > 0.1  # the producer was held back by the 5 ms consumer
        assert len(SEEN["a"]) == 30


async def test_lane_full_times_out_to_the_emitter():
    from fluxrig.config import load_config
    from fluxrig.errors import LaneFull

    cfg = load_config(None, environ={"FLUXRIG_RACK_LANE_QUEUE_SIZE": "1", "FLUXRIG_RACK_LANE_SEND_TIMEOUT": "50ms"})
    gate = asyncio.Event()

    rt = Runtime(scenario_from_yaml(chain(0)), rack_config=cfg.rack)
    a = rt.build().gears["a"]  # built, not started: the lane below is the only thing running
    lane = Lane(a, "in", 1, 0.05)

    async def blocked(port, msg):
        await gate.wait()

    a.process = blocked
    lane.start()
    await lane.put(FluxMsg())  # taken by the consumer, which blocks
    await asyncio.sleep(0)
    await lane.put(FluxMsg())  # fills the queue
    with pytest.raises(LaneFull, match="stayed full"):
        await lane.put(FluxMsg())
    gate.set()
    await lane.join()
    lane.close()


async def test_start_failure_rolls_back():
    text = """
meta: {version: '1'}
gears:
  - {name: ok, type: test_recorder}
  - {name: bad, type: test_recorder, config: {fail_start: true}}
  - {name: src, type: test_pump, config: {n: 1}}
wires:
  - {from: src.out, to: ok.in}
  - {from: src.out, to: bad.in}
"""
    BUILT.clear()
    rt = Runtime(scenario_from_yaml(text))
    with pytest.raises(GearStartError, match="bad failed to start") as ei:
        await rt.start()
    assert BUILT["ok"].state == GearState.STOPPED  # started, then stopped by the rollback
    assert BUILT["bad"].state == GearState.STOPPED
    assert BUILT["src"].state == GearState.CREATED  # the source never started
    # The running graph (the empty one) is untouched and the runtime takes the next swap.
    assert rt.gears == {} and rt.state == RuntimeState.RUNNING
    assert ei.value.gear == "bad" and not ei.value.report.ok and sorted(ei.value.report.added) == ["bad", "ok", "src"]


async def test_drain_finishes_queued_work():
    from fluxrig.config import load_config

    cfg = load_config(None, environ={"FLUXRIG_RACK_FUSE_SYNC_CHAINS": "false"})
    async with running(chain(50, ", config: {delay: 0.001}"), rack_config=cfg.rack) as rt:
        await rt.gears["src"].done
        clean = await rt.drain(5.0)
        assert clean
        assert len(SEEN["a"]) == 50


async def test_illegal_transition():
    a = Runtime(scenario_from_yaml(chain())).build().gears["a"]
    with pytest.raises(IllegalTransition) as ei:
        a.transition(GearEvent.DRAIN)
    assert (ei.value.machine, ei.value.name, ei.value.state, ei.value.event) == ("gear", "a", "created", "drain")
    assert a.state == GearState.CREATED
