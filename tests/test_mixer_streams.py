"""flux-msg's definition (fluxrig_mixer/streams.py) against a real nats-server: a stream made by
an older Mixer (discard old, 24 h) is moved in place to discard NEW, no age limit and the
per-source quota, keeping its messages; an operator's short undelivered-age limit is accepted."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import nats
import pytest
from fluxrig_mixer.config import load_config
from fluxrig_mixer.streams import ensure_streams
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

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
    assert c.max_msgs_per_subject == 1024 and c.discard_new_per_subject
    assert info.state.messages == 1


async def test_an_operator_age_limit_shorter_than_the_duplicate_window_is_accepted(js):
    cfg = load_config(None, environ={}, overrides={"snake.lane_undelivered_max_age": 30.0,
                                                   "snake.lane_max_msgs_per_subject": 0})  # fmt: skip
    await ensure_streams(js, cfg.snake)
    c = (await js.stream_info(S.STREAM_MSG)).config
    assert c.max_age == 30 and c.duplicate_window == 30 and c.max_msgs_per_subject in (-1, 0)
    assert not c.discard_new_per_subject
