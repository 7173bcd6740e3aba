"""The Rack's one request loop: every request type handled in order, refusals never stop it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fluxrig.config import load_config
from fluxrig.rack import Rack
from fluxrig.rack_requests import ApplyScenario, ControlCommand, ReloadFile, RequestQueue, SetLogLevel, Stop
from fluxrig.wire.vocab import LogLevel

SCENARIO = """
meta: {{name: loop, version: "{version}"}}
gears:
  - {{name: ticker, type: generator, config: {{interval: 50ms, template: {{raw: "t"}}}}}}
  - {{name: {sink}, type: sink, config: {{mode: "null"}}}}
wires:
  - {{from: ticker.out, to: {sink}.in}}
"""


async def _wait(predicate, timeout: float = 10.0, what: str = "condition", task=None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if task is not None and task.done():
            task.result()  # the Rack stopped: say why
            raise AssertionError(f"the Rack stopped while waiting for {what}")
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def scenario_file(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(SCENARIO.format(version="1", sink="out"))
    return path


async def test_requests_are_handled_in_order_and_a_refusal_never_stops_the_loop(tmp_path, scenario_file):
    config = load_config(None, environ={"FLUXRIG_BASE_STATE_DIR": str(tmp_path / "state")})
    rack = Rack(config, str(scenario_file))
    events = []
    rack.event_listeners.append(events.append)
    task = asyncio.get_running_loop().create_task(rack.run())
    root_level = logging.getLogger().level
    try:
        await _wait(
            lambda: rack.runtime is not None and rack.runtime.state == "running", what="the graph running", task=task
        )
        assert rack.runtime.scenario.version == "1"

        rack.requests.post_nowait(SetLogLevel(LogLevel.DEBUG))
        await _wait(lambda: logging.getLogger().level == logging.DEBUG, what="log level applied")

        # A reload: the sink is renamed, the generator kept (same object, its sequence goes on).
        ticker = rack.runtime.gears["ticker"]
        scenario_file.write_text(SCENARIO.format(version="2", sink="out2"))
        rack.request_reload()
        await _wait(lambda: rack.runtime.scenario.version == "2", what="reload to version 2")
        assert rack.runtime.gears["ticker"] is ticker and "out2" in rack.runtime.gears
        # The reload's report follows its cut-over: the old version retires (drains) first.
        await _wait(lambda: events and events[-1].get("ok"), what="the reload reported")
        assert events[-1]["kept"] == ["ticker"]

        # An invalid file is refused; the graph and the loop go on.
        scenario_file.write_text("meta: {name: loop}\ngears: [{name: x, type: nope}]\n")
        rack.requests.post_nowait(ReloadFile())
        await _wait(lambda: events[-1].get("ok") is False, what="the refused reload reported")
        assert rack.runtime.scenario.version == "2" and not task.done()

        # A standalone Rack has no passport: any command is refused, the outcome says why.
        command = ControlCommand("kill", b"\xa0", (), None)
        await rack.requests.post(command)
        outcome = await asyncio.wait_for(command.outcome, 5)
        assert outcome["ok"] is False and "refused" in outcome["detail"]
        assert rack.killswitch.killed is None and "ticker" in rack.runtime.gears

        # A scenario the Rack cannot run is refused through its outcome, never by raising here.
        apply = ApplyScenario({"meta": {"name": "x"}, "gears": [{"name": "g", "type": "nope"}]}, "9@x", "")
        await rack.requests.post(apply)
        with pytest.raises(Exception, match="unknown gear type"):
            await asyncio.wait_for(apply.outcome, 5)
        assert rack.runtime.scenario.version == "2"

        rack.requests.post_nowait(Stop("test"))
        assert await asyncio.wait_for(task, 20) == 0
        assert rack.runtime.state == "stopped"
    finally:
        logging.getLogger().setLevel(root_level)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_what_is_left_in_the_queue_at_stop_is_cancelled_not_left_hanging():
    queue = RequestQueue(maxsize=2)
    first = ApplyScenario({}, "1", "")
    assert queue.post_nowait(first) and queue.post_nowait(Stop())
    assert not queue.post_nowait(Stop())  # full: refused and logged, never blocking a signal handler
    assert queue.cancel_pending() == 2
    assert first.outcome.cancelled() and queue.get_nowait() is None
