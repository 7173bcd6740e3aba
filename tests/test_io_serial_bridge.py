"""scenarios/serial-tcp-bridge.yaml end to end over a real pty and real TCP (in-process and as
a `fluxrig run` subprocess), and scenarios/serial-to-mixer.yaml's validation."""

import asyncio
import os
import subprocess
import sys

import pytest
from helpers import ROOT, free_port, running, scenario_from_yaml, wait_port
from serial_pty import PtyDevice, wait_until, wait_up

from fluxrig.errors import FluxError
from fluxrig.runtime import Runtime

BRIDGE = os.path.join(ROOT, "scenarios", "serial-tcp-bridge.yaml")
TO_MIXER = os.path.join(ROOT, "scenarios", "serial-to-mixer.yaml")
EVERY_BYTE = bytes(range(256))


@pytest.fixture
def device(tmp_path):
    dev = PtyDevice(str(tmp_path / "ttyBRIDGE"))
    yield dev
    dev.close()


async def read_n(reader, n, timeout=5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def round_trip(port: int, device: PtyDevice) -> None:
    """TCP -> device and device -> TCP, every byte value, unchanged."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(EVERY_BYTE * 4)
        await w.drain()
        assert await device.read_exactly(1024) == EVERY_BYTE * 4
        await device.write(EVERY_BYTE[::-1] * 4)
        assert await read_n(r, 1024) == EVERY_BYTE[::-1] * 4
    finally:
        w.close()
        await w.wait_closed()


async def test_bridge_in_process_bytes_both_ways_one_client_at_a_time(device):
    port = free_port()
    env = {
        "FLUXRIG_SERIAL_PORT": device.link,
        "FLUXRIG_BRIDGE_PORT": str(port),
        "FLUXRIG_BRIDGE_HOST": "127.0.0.1",
        "FLUXRIG_SERIAL_BAUD": "115200",
    }
    with open(BRIDGE) as fh:
        text = fh.read()
    async with running(text, env=env) as rt:
        await wait_up(rt.gears["device"])
        await round_trip(port, device)
        await wait_until(lambda: not rt.gears["tcp"].endpoint.connections)

        # one client at a time: a second is closed at once, the first keeps working
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: len(rt.gears["tcp"].endpoint.connections) == 1)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r2.read(), 3) == b""
        w2.close()
        await device.write(b"to the first client")
        assert await read_n(r1, 19) == b"to the first client"
        w1.close()
        await wait_until(lambda: not rt.gears["tcp"].endpoint.connections)

        # device output with no client is dropped and counted, not replayed to the next one
        await device.write(b"nobody listens")
        await wait_until(lambda: rt.gears["undelivered"].counters.messages_in >= 1)
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: len(rt.gears["tcp"].endpoint.connections) == 1)
        await device.write(b"fresh")
        assert await read_n(r3, 5) == b"fresh"

        # the device is unplugged and comes back: the client stays, the bridge resumes
        device.unplug()
        await wait_until(lambda: rt.gears["device"].link is None)
        w3.write(b"lost while unplugged")
        await w3.drain()
        await wait_until(lambda: rt.gears["faults"].counters.messages_in >= 1)
        back = PtyDevice(device.link)
        try:
            await wait_up(rt.gears["device"], 5)
            w3.write(b"after replug")
            await w3.drain()
            assert await back.read_exactly(12) == b"after replug"
            await back.write(b"device is back")
            assert await read_n(r3, 14) == b"device is back"
        finally:
            w3.close()
            back.close()


def test_bridge_as_a_rack_process(device, start_rack, rack_env):
    port = free_port()
    rack_env.update(FLUXRIG_SERIAL_PORT=device.link, FLUXRIG_BRIDGE_PORT=str(port))
    rack = start_rack("run", "--scenario", "scenarios/serial-tcp-bridge.yaml")
    wait_port(port, 20)

    async def go():
        # The port listens before the device is open, and one client at a time means a client
        # may be refused while the server still holds the one before (wait_port's probe): retry
        # until a byte gets through to the device.
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"?")
                await w.drain()
                assert await device.read_exactly(1, timeout=0.3) == b"?"
                break
            except (ConnectionError, TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        try:
            await device.write(b"ready")
            assert await read_n(r, 5) == b"ready"
            w.write(EVERY_BYTE)
            await w.drain()
            assert await device.read_exactly(256) == EVERY_BYTE
            await device.write(EVERY_BYTE[::-1] * 8)
            assert await read_n(r, 2048) == EVERY_BYTE[::-1] * 8
        finally:
            w.close()

    asyncio.run(go())
    code, _out, err = rack.stop()
    assert code == 0, err
    assert "opened" in err and device.link in err


def test_serial_to_mixer_validates_and_waits_for_the_guaranteed_lane(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fluxrig.cli.main", "scenario", "validate", TO_MIXER],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "valid (serial-to-mixer" in r.stdout
    with open(TO_MIXER) as fh:
        scenario = scenario_from_yaml(fh.read(), env={"FLUXRIG_SERIAL_FRAMING": "modbus_rtu"})
    assert [w.lane for w in scenario.wires] == ["", "guaranteed", "guaranteed"]
    assert {g.name: g.deploy for g in scenario.gears} == {"meter": "field-gw", "stamp": "field-gw", "store": "hub"}
    with pytest.raises(FluxError, match="needs the guaranteed lane"):
        Runtime(scenario, rack_name="field-gw").build()
