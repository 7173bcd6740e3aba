"""A restarted Mixer adopts the nats-server its predecessor left running (issue 13 gap, issue 14):
the survivor takes the new Mixer's configuration on SIGHUP and is supervised from then on
(signalled, restarted when it dies, stopped on stop()); a survivor that cannot take it (its
listen port changed) is stopped and a new server started, as before. Real nats-server
processes; the "previous Mixer" is a SnakeSupervisor abandoned without stop()."""

from __future__ import annotations

import asyncio
import os
import signal

import nats
import pytest
from fluxrig_mixer.snake import SnakeSupervisor, free_port

pytestmark = pytest.mark.mixer


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _snake(state, port, **kw) -> SnakeSupervisor:
    return SnakeSupervisor(
        state_dir=str(state), host="127.0.0.1", port=port, insecure_plaintext=True, restart_backoff=0.1, **kw
    )


def _abandon(snake: SnakeSupervisor) -> None:
    """What a Mixer killed outright leaves: its nats-server, with nobody watching it."""
    snake._child._watcher.cancel()


async def _round_trip(snake: SnakeSupervisor) -> None:
    nc = await nats.connect(snake.url, **snake.client_options(), allow_reconnect=False, connect_timeout=2)
    try:
        sub = await nc.subscribe("adopt.test")
        await nc.publish("adopt.test", b"x")
        assert (await sub.next_msg(timeout=2)).data == b"x"
    finally:
        await nc.close()


async def test_a_survivor_is_adopted_then_supervised(tmp_path):
    port = free_port()
    first = _snake(tmp_path, port)
    await first.start([])
    pid = first.pid
    _abandon(first)
    second = _snake(tmp_path, port)
    try:
        await second.start([])
        assert second.adopted == pid and second.pid == pid and second.running
        await _round_trip(second)  # the new Mixer's own identity works: the config was reloaded
        with pytest.raises(Exception):  # the old Mixer's identity is gone
            nc = await nats.connect(first.url, **first.client_options(), allow_reconnect=False, connect_timeout=2)
            await nc.close()
        assert await second.reload([], wait=3.0)  # SIGHUP reaches the adopted server
        # Supervised: the adopted server dies, a new one is started.
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if second.pid not in (None, pid) and second.running:
                break
            await asyncio.sleep(0.05)
        assert second.pid not in (None, pid) and second.restarts == 1
        await _round_trip(second)
    finally:
        await second.stop()
    assert not _alive(pid) and second.pid is None


async def test_a_survivor_that_cannot_take_the_new_config_is_replaced(tmp_path):
    first = _snake(tmp_path, free_port())
    await first.start([])
    pid = first.pid
    _abandon(first)
    second = _snake(tmp_path, free_port())  # another listen port: not reloadable
    try:
        await second.start([])
        assert second.adopted is None and second.pid != pid
        assert not _alive(pid), "the survivor was left running"
        await _round_trip(second)
    finally:
        await second.stop()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_adoption_can_be_turned_off(tmp_path):
    port = free_port()
    first = _snake(tmp_path, port)
    await first.start([])
    pid = first.pid
    _abandon(first)
    second = _snake(tmp_path, port, adopt_survivor=False)
    try:
        await second.start([])
        assert second.adopted is None and second.pid != pid and not _alive(pid)
    finally:
        await second.stop()
