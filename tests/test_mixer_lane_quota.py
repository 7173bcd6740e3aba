"""The guaranteed lane's quotas against a real Mixer (nats-server child, DuckDB) and real Racks:
no message a sender was acknowledged for is removed before its receiver consumed it.

Racks `pay` (one payment message) and `big` (large or many messages) feed a sink on Rack `hub`,
which is away while they send. On the code before (flux-msg: discard old, 24 h, one shared byte
cap) `big` evicted `pay`'s acknowledged message and an age limit deleted the away receiver's
backlog; here a full quota refuses new messages instead (pushed back into the sender's lane WAL,
counted, alerted at 80 % / 100 % by the Mixer), and once `hub` returns it gets every message
exactly once; what it consumed is then removed from the stream by the Mixer.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from mixer_fixtures import make_mixer, wait_for
from test_mixer_lanes import RackRunner, activate, rack_config, sink_lines

from fluxrig.wire import subjects as S

pytestmark = pytest.mark.timeout(150)

BIG = 10_000

SCENARIO = """
meta: {{name: quota, version: "{version}"}}
racks: [{{name: pay}}, {{name: big}}, {{name: hub}}]
gears:
  - {{name: payg, type: generator, deploy: pay,
     config: {{count: {pay_count}, interval: 400ms, start_delay: {pay_delay}, template: {{raw: "pay{{{{ seq }}}}"}}}}}}
  - {{name: bigg, type: generator, deploy: big,
     config: {{count: {big_count}, interval: 150ms, start_delay: {big_delay},
              template: {{raw: "big{{{{ seq }}}}-{filler}"}}}}}}
  - {{name: store, type: sink, deploy: hub, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: payg.out, to: store.in}}
  - {{from: bigg.out, to: store.in}}
"""


async def run_away_receiver(tmp_path, mixer_overrides: dict, *, pay_count=1, pay_delay="0s", big_count=8,
                            big_delay="1s", filler=BIG, while_away=None, away_s=0.0):  # fmt: skip
    """Start pay, big and hub; stop hub; activate; let pay and big send while hub is away
    (`while_away(mixer, runners)` checks the state then); bring hub back; return its sink lines."""
    mixer = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True, **mixer_overrides})
    runners = {n: RackRunner(rack_config(tmp_path, n, mixer.snake.url, mixer)) for n in ("pay", "big", "hub")}
    out = tmp_path / "store.jsonl"
    try:
        for r in runners.values():
            await r.start()
        await runners["hub"].stop()
        text = SCENARIO.format(version=1, pay_count=pay_count, pay_delay=pay_delay, big_count=big_count,
                               big_delay=big_delay, filler="x" * filler, path=out)  # fmt: skip
        await activate(mixer, text, [runners["pay"], runners["big"]])
        if while_away is not None:
            await while_away(mixer, runners)
        if away_s:
            await asyncio.sleep(away_s)
        hub = runners["hub"] = RackRunner(runners["hub"].config)
        await hub.start()
        total = pay_count + big_count
        await wait_for(lambda: len(sink_lines(out)) >= total, timeout=60, what=f"{total} messages at the hub")
        await asyncio.sleep(0.5)
        lines = sink_lines(out)
        # The Mixer removes what the hub consumed (its ack floor), so the stream empties.
        await wait_for(lambda: mixer.controller.lanes.quota.get("stream_messages") == 0, timeout=20,
                       what="consumed messages removed from flux-msg")  # fmt: skip
        return mixer, runners, lines
    finally:
        for r in runners.values():
            await r.stop()
        await mixer.stop()


def assert_all_once(lines, pay_count: int, big_count: int) -> None:
    raws = [line["raw"].split("-", 1)[0] for line in lines]
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    want = [f"pay{i}" for i in range(1, pay_count + 1)] + [f"big{i}" for i in range(1, big_count + 1)]
    assert sorted(raws) == sorted(want), f"lost: {sorted(set(want) - set(raws))}"
    bigs = [r for r in raws if r.startswith("big")]
    assert bigs == [f"big{i}" for i in range(1, big_count + 1)], "big's messages out of order"


async def stream_subjects(mixer) -> dict:
    info = await mixer.js.stream_info(S.STREAM_MSG, subjects_filter=S.msg_all())
    return dict(info.state.subjects or {})


async def test_a_full_byte_quota_pushes_the_sender_back_and_evicts_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING)

    async def while_away(mixer, runners):
        big = runners["big"].rack.bus
        await wait_for(lambda: big.metrics()["quota_rejections"] > 0, timeout=30, what="big pushed back")
        await asyncio.sleep(1.5)  # big keeps retrying: its quota stays full
        subjects = await stream_subjects(mixer)
        assert subjects.get("flux.msg.pay.payg.out") == 1, f"pay's acknowledged message evicted: {subjects}"
        m = big.metrics()
        assert m["quota_full"] and m["backlog_records"] > 0  # held and counted in big's lane WAL
        # at 80 % the Mixer alerts (the exact 100 % of a byte cap depends on the next message's size)
        await wait_for(lambda: mixer.controller.lanes.quota.get("alerts", {}).get("stream") in ("alert", "full"),
                       timeout=10, what="the Mixer's quota alert")  # fmt: skip

    _mixer, _runners, lines = await run_away_receiver(
        tmp_path, {"snake.stream_max_bytes": 48 * 1024, "snake.lane_max_msgs_per_subject": 0}, while_away=while_away
    )
    assert_all_once(lines, 1, 8)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "used for flux-msg as a whole" in text and "its quota is full" in text


async def test_one_racks_quota_full_does_not_starve_another(tmp_path):
    async def while_away(mixer, runners):
        big = runners["big"].rack.bus
        await wait_for(lambda: big.metrics()["quota_rejections"] > 0, timeout=30, what="big pushed back")
        # pay starts sending only now, while big's quota is full: all of pay's messages are stored
        await wait_for(lambda: runners["pay"].rack.bus.metrics()["published"] == 3, timeout=30, what="pay stored")
        subjects = await stream_subjects(mixer)
        assert subjects == {"flux.msg.pay.payg.out": 3, "flux.msg.big.bigg.out": 3}, subjects
        assert runners["pay"].rack.bus.metrics()["quota_rejections"] == 0
        await wait_for(lambda: mixer.controller.lanes.quota.get("alerts", {}).get("flux.msg.big.bigg.out") == "full",
                       timeout=10, what="the Mixer's alert for big's subject")  # fmt: skip

    _mixer, _runners, lines = await run_away_receiver(
        tmp_path, {"snake.lane_max_msgs_per_subject": 3}, pay_count=3, pay_delay="2s", big_count=8,
        big_delay="0s", filler=10, while_away=while_away,
    )  # fmt: skip
    assert_all_once(lines, 3, 8)


async def test_a_receiver_away_past_an_age_limit_still_gets_its_backlog(tmp_path):
    async def while_away(mixer, runners):
        info = await mixer.js.stream_info(S.STREAM_MSG)
        assert not info.config.max_age  # no age limit on undelivered messages by default
        await wait_for(lambda: runners["big"].rack.bus.metrics()["published"] == 4, timeout=30, what="big sent")

    # snake.stream_max_age of 1 s would have deleted the backlog of a receiver away 3 s.
    _mixer, _runners, lines = await run_away_receiver(
        tmp_path, {"snake.stream_max_age": 1.0}, big_count=4, big_delay="0s", filler=10, while_away=while_away,
        away_s=3.0,
    )  # fmt: skip
    assert_all_once(lines, 1, 4)
