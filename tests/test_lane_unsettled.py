"""The guaranteed lane's "unsettled at bind" count is exact (issue 13): it names the messages an
earlier connection left unsettled (they come back after the consumer's ack_wait, behind newer
ones), not those the earlier incarnation gave back at its stop (NAKed, redelivered first) nor
those another consumer NAKed. Real Mixer (nats-server child, DuckDB) and Racks on loopback.

Before, the count was `num_ack_pending` at bind less what the Rack held: JetStream counts a
NAKed message as pending until it is acked, so every graceful restart with traffic warned of
"1 message(s) ... after ack_wait" that then came at once, and the test's phase 2 said 5, not 3.
"""

from __future__ import annotations

import logging

import pytest
from mixer_fixtures import make_mixer, wait_for
from test_mixer_lanes import LANE, RackRunner, activate, rack_config, sink_lines

from fluxrig.wire import subjects as S

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(60)]  # a Mixer in-process: the Mixer pass

WARNING = "delivered to an earlier connection and not settled"


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


async def test_unsettled_at_bind_counts_only_what_comes_after_ack_wait(tmp_path, caplog):
    mixer = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    edge, hub = (RackRunner(rack_config(tmp_path, n, mixer.snake.url, mixer)) for n in ("edge", "hub"))
    out = tmp_path / "store.jsonl"
    n = 150
    try:
        await edge.start()
        await hub.start()
        caplog.set_level(logging.WARNING, logger="fluxrig.agent")
        await activate(mixer, LANE.format(version=1, count=n, interval="20ms", path=out), [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= 20, timeout=15, what="traffic flowing")

        # 1. A graceful restart mid-stream: what the hub fetched and did not route it gives
        # back (NAKed in order); redelivered first, none of it is late.
        await hub.stop()
        hub = RackRunner(hub.config)
        await hub.start()
        await wait_for(lambda: len(sink_lines(out)) >= 60, timeout=15, what="traffic after the restart")
        assert hub.rack.bus.metrics()["unsettled_at_bind"] == 0
        assert warnings(caplog) == []

        # 2. While the hub is away, another puller takes five messages, NAKs two and leaves
        # three unsettled: exactly three come back after ack_wait.
        await hub.stop()
        psub = await mixer.js.pull_subscribe_bind("in-hub", stream=S.STREAM_MSG)
        msgs = await psub.fetch(5, timeout=10)
        assert len(msgs) == 5
        for m in msgs[:2]:
            await m.nak()
        await psub.unsubscribe()
        info = await mixer.js.consumer_info(S.STREAM_MSG, "in-hub")
        assert info.num_ack_pending >= 5  # the three, the two NAKed, and what the hub gave back
        hub = RackRunner(hub.config)
        await hub.start()
        await wait_for(lambda: hub.rack.bus.metrics()["unsettled_at_bind"], timeout=15, what="the count after bind")
        await wait_for(lambda: len(sink_lines(out)) >= n - 3, timeout=20, what="all but the three at the hub")
        assert hub.rack.bus.metrics()["unsettled_at_bind"] == 3
        (line,) = warnings(caplog)
        assert line.startswith("guaranteed lane: 3 message(s) of in-hub"), line
        # the three are the ones missing: they are JetStream's to redeliver after ack_wait (30 s)
        raws = {int(x["raw"][1:]) for x in sink_lines(out)}
        assert len(raws) == n - 3
    finally:
        await hub.stop()
        await edge.stop()
        await mixer.stop()
