"""Guaranteed-lane messages a receiving Rack cannot use are parked, never dropped (issue 13:
"nothing is dropped without an ERROR log, a counter and, for the lane, a parked copy an operator
can inspect"), against a real Mixer (nats-server child, DuckDB) and real Racks on loopback.

Rack `edge` feeds a file sink on Rack `hub` over the lane; the test then publishes, on the
edge's lane subject through the Snake, a batch that does not decode and a batch whose two
records are not FluxMsgs, then a good one. Each unusable payload must end as its own file in
`<store_dir>/lanes/parked/` (bytes verbatim, mode 0600), be counted in the bus metrics, be
logged at ERROR, be listed by `fluxrig inspect-wal <dir> --parked`, and be acknowledged (the
consumer holds nothing back); the good batch behind them is delivered.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import cbor2
import pytest
from mixer_fixtures import make_mixer, wait_for
from test_mixer_lanes import LANE, RackRunner, activate, rack_config, sink_lines

from fluxrig.msg import FluxMsg
from fluxrig.wire import subjects as S
from fluxrig.wire.batch import encode_lane_batch

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(60)]  # a Mixer in-process: the Mixer pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def test_unusable_lane_messages_are_parked_counted_logged_and_listed(tmp_path, caplog):
    mixer = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    edge, hub = (RackRunner(rack_config(tmp_path, n, mixer.snake.url, mixer)) for n in ("edge", "hub"))
    out = tmp_path / "store.jsonl"
    try:
        await edge.start()
        await hub.start()
        await activate(mixer, LANE.format(version=1, count=2, interval="10ms", path=out), [edge, hub])
        await wait_for(lambda: len(sink_lines(out)) >= 2, timeout=20, what="m1, m2 at the hub")
        bus = hub.rack.bus
        before = dict(bus.metrics())
        subject = "flux.msg.edge.gen.out"
        bad_batch = cbor2.dumps([99, ["r1", b"\xa0"]])  # a batch of a version no Rack reads
        not_msgs = encode_lane_batch([("bad-1", b"\xff not cbor 1"), ("bad-2", b"\xff not cbor 2")])
        good = encode_lane_batch([("good-3", FluxMsg(raw=b"m3").to_cbor())])
        with caplog.at_level(logging.ERROR):
            for i, payload in enumerate((bad_batch, not_msgs, good)):
                await mixer.js.publish(subject, payload, stream=S.STREAM_MSG, headers={"Nats-Msg-Id": f"inject-{i}"})
            await wait_for(lambda: len(sink_lines(out)) >= 3, timeout=20, what="m3 behind the unusable ones")
            await wait_for(lambda: bus.metrics()["parked"] - before["parked"] >= 3, timeout=10, what="3 parked")
            await wait_for(lambda: _settled(mixer), timeout=15, what="in-hub: nothing pending or unacked")
        m = bus.metrics()
        assert m["parked"] - before["parked"] == 3 and m["park_failures"] == before["park_failures"]
        assert m["undecodable_msgs"] - before["undecodable_msgs"] == 3
        assert [line["raw"] for line in sink_lines(out)] == ["m1", "m2", "m3"]

        errors = [
            r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "parked in" in r.getMessage()
        ]
        assert len(errors) == 3, errors
        assert all(subject in e for e in errors), errors

        lane_dir = os.path.join(hub.config.store_dir, "lanes")
        parked_dir = os.path.join(lane_dir, "parked")
        files = sorted(n for n in os.listdir(parked_dir) if n.endswith(".rec"))
        assert len(files) == 3, files  # two bad records of one batch are two copies, not one
        for name in os.listdir(parked_dir):  # the records and their provenance
            assert stat.S_IMODE(os.stat(os.path.join(parked_dir, name)).st_mode) == 0o600

        cli = subprocess.run(
            [sys.executable, "-m", "fluxrig.cli.main", "inspect-wal", lane_dir, "--parked"],
            capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ},
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        listed = [json.loads(line) for line in cli.stdout.splitlines()]
        by_reason: dict[str, list[bytes]] = {}
        for entry in listed:
            with open(entry["file"], "rb") as fh:
                by_reason.setdefault(entry["reason"], []).append(fh.read())
            assert entry["key"].startswith("in-") and entry["bytes"] > 0
        # each says where it came from: the subject, the stream message, why
        infos = sorted((e["reason"], e["info"].get("record_index", -1)) for e in listed)
        assert infos == [("not-a-fluxmsg", 0), ("not-a-fluxmsg", 1), ("undecodable-batch", -1)], listed
        for e in listed:
            assert e["info"]["subject"] == subject and e["info"]["stream_seq"] == int(e["key"][3:19], 16)
            assert e["info"]["msg_id"].startswith("inject-") and e["info"]["why"], e
        assert by_reason == {
            "undecodable-batch": [bad_batch],
            "not-a-fluxmsg": [b"\xff not cbor 1", b"\xff not cbor 2"],
        }, listed
    finally:
        await hub.stop()
        await edge.stop()
        await mixer.stop()


async def _settled(mixer) -> bool:
    info = await mixer.js.consumer_info(S.STREAM_MSG, "in-hub")
    return info.num_ack_pending == 0 and info.num_pending == 0
