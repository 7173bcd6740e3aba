"""flux-msg's definition (fluxrig_mixer/streams.py) against a real nats-server: a stream made by
an older Mixer (discard old, 24 h) is moved in place to discard NEW, no age limit and the
per-source quota, keeping its messages; an operator's short undelivered-age limit is accepted."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys

import nats
import pytest
from fluxrig_mixer.config import load_config
from fluxrig_mixer.lanes import LaneConsumers
from fluxrig_mixer.streams import LANE_MAX_MSG_BYTES, ensure_streams
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from fluxrig.agent.publisher import is_quota_full
from fluxrig.wire import subjects as S

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def js(tmp_path):
    port = _free_port()
    binary = os.path.join(os.path.dirname(sys.executable), "nats-server")
    proc = subprocess.Popen([binary, "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    nc = None
    try:
        for _ in range(100):
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, allow_reconnect=False)
                break
            except Exception:
                await asyncio.sleep(0.1)
        yield nc.jetstream()
    finally:
        if nc is not None:
            await nc.close()
        proc.terminate()
        proc.wait(10)


async def test_an_old_stream_is_updated_in_place_and_keeps_its_messages(js):
    await js.add_stream(StreamConfig(name=S.STREAM_MSG, subjects=[S.msg_all()], storage=StorageType.FILE,
                                     retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD, max_age=86400,
                                     max_bytes=1 << 30, duplicate_window=120))  # fmt: skip
    await js.publish("flux.msg.edge.gen.out", b"queued before the upgrade")
    await ensure_streams(js, load_config(None, environ={}).snake)
    info = await js.stream_info(S.STREAM_MSG)
    c = info.config
    assert c.discard == DiscardPolicy.NEW and not c.max_age and c.retention == RetentionPolicy.LIMITS
    # the default count keeps healthy lanes free of push-back (streams.py says what it costs)
    assert c.max_msgs_per_subject == 1024 and c.discard_new_per_subject
    assert c.max_msg_size == LANE_MAX_MSG_BYTES
    assert info.state.messages == 1


async def test_an_operator_age_limit_shorter_than_the_duplicate_window_is_accepted(js):
    cfg = load_config(None, environ={}, overrides={"snake.lane_undelivered_max_age": 30.0,
                                                   "snake.lane_max_msgs_per_subject": 0})  # fmt: skip
    await ensure_streams(js, cfg.snake)
    c = (await js.stream_info(S.STREAM_MSG)).config
    assert c.max_age == 30 and c.duplicate_window == 30 and c.max_msgs_per_subject in (-1, 0)
    assert not c.discard_new_per_subject


async def _publish(js, subject: str, body: bytes, msg_id: str) -> bool:
    """True when flux-msg stored it; False when a quota pushed it back (the Rack's pump keeps
    the record in its lane WAL and retries: fluxrig.agent.publisher.is_quota_full)."""
    try:
        await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
        return True
    except Exception as exc:
        assert is_quota_full(exc), f"refused, but not as a full quota: {exc!r}"
        return False


async def test_one_source_cannot_fill_the_lane_and_its_push_back_arrives_once_it_drains(js, caplog):
    """Scaled down: a 1 MiB lane, batches of at most 32 KiB. Before, the default count (1024
    per subject) let one port fill the stream, and then every other Rack was refused too."""
    cfg = load_config(None, environ={}, overrides={"snake.stream_max_bytes": 1 << 20, "snake.lane_max_msg_bytes": 32 * 1024,
                                                   "snake.lane_subject_share": 0.25})  # fmt: skip
    await ensure_streams(js, cfg.snake)
    c = (await js.stream_info(S.STREAM_MSG)).config
    assert c.max_msgs_per_subject == (1 << 20) // 4 // (32 * 1024) == 8  # derived: a quarter of the stream
    assert c.max_msgs_per_subject * c.max_msg_size <= c.max_bytes // 4, "one port may fill over a quarter"
    flood, pay = "flux.msg.big.gen.out", "flux.msg.pay.gen.out"
    body = b"x" * (30 * 1024)
    want = 40  # 40 x 30 KiB: more than the whole stream
    stored = 0
    while stored < want and await _publish(js, flood, body + b"%d" % stored, f"big-{stored}"):
        stored += 1
    assert 0 < stored < want, "the flooding port was never pushed back"
    info = await js.stream_info(S.STREAM_MSG)
    assert info.state.bytes <= c.max_bytes // 4 + c.max_msg_size, "one port filled more than its share"
    # Another Rack's port is still accepted while the flood is pushed back.
    for i in range(3):
        assert await _publish(js, pay, b"pay%d" % i, f"pay-{i}"), "another Rack was pushed back by the flood"
    lanes = LaneConsumers(js, None, None)
    caplog.set_level(logging.WARNING, logger="fluxrig.mixer.lanes")
    quota = await lanes.purge()
    assert quota["alerts"].get(flood) == "full", quota  # the Mixer's alert for that port
    assert "quota FULL for source flux.msg.big.gen.out" in caplog.text
    # The receiver drains; the Mixer removes what it acked; the pushed-back records then flow.
    sub = await js.pull_subscribe(flood, durable="in-hub", stream=S.STREAM_MSG,
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, filter_subject=flood))  # fmt: skip
    got: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + 15
    while len(got) < want:
        assert asyncio.get_running_loop().time() < deadline, f"only {len(got)} of {want} delivered"
        try:
            for m in await sub.fetch(16, timeout=0.5):
                got.append(m.data[len(body) :])
                await m.ack_sync()
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        await lanes.purge()  # the Mixer's pass, every 2 s in service
        while stored < want and await _publish(js, flood, body + b"%d" % stored, f"big-{stored}"):
            stored += 1  # the sender's WAL retrying what was pushed back
    assert got == [b"%d" % i for i in range(want)], "a pushed-back batch was lost, doubled or reordered"


async def test_a_lower_derived_quota_does_not_trim_an_existing_backlog(js, caplog):
    """JetStream trims a subject's oldest messages when its per-subject count is lowered below
    what it holds: the upgrade to the derived quota keeps the larger count until it drains."""
    old = load_config(None, environ={}, overrides={"snake.stream_max_bytes": 1 << 20,
                                                   "snake.lane_max_msgs_per_subject": 1024})  # fmt: skip
    await ensure_streams(js, old.snake)
    for i in range(10):
        await js.publish("flux.msg.edge.gen.out", b"queued %d" % i)
    new = load_config(None, environ={}, overrides={"snake.stream_max_bytes": 1 << 20, "snake.lane_max_msg_bytes": 32 * 1024,
                                                   "snake.lane_subject_share": 0.25})  # fmt: skip
    caplog.set_level(logging.WARNING, logger="fluxrig.mixer.streams")
    await ensure_streams(js, new.snake)  # derived: 8 per subject
    info = await js.stream_info(S.STREAM_MSG)
    assert info.state.messages == 10, "unconsumed messages trimmed by the lower quota"
    assert info.config.max_msgs_per_subject == 10
    assert "keeping 10 until it drains" in caplog.text
