"""The Snake survives a Mixer killed outright (the OOM killer's SIGKILL), and the next Mixer
adopts the survivor (same process, the Racks' connections kept; it stops it cleanly and starts
its own only when the survivor cannot take its configuration: tests/test_cluster_adopt.py)
(mixer/fluxrig_mixer/supervisor.py, issue 13 item 4). Real processes: `fluxrig-mixer serve`, its nats-server child, a real Rack agent.

Before: the child had PR_SET_PDEATHSIG=SIGTERM, so nats-server died with the Mixer and every
Rack lost its bus (guaranteed lanes included) for as long as the Mixer stayed down."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import nats
from test_mixer_guard import MixerProcess, _enrolled_probe

from fluxrig.wire import subjects as S


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _lane_publish(url: str, passport, agent) -> None:
    """A JetStream publish on the Rack's own guaranteed-lane subject (its own NKey), acked by the Snake."""
    nc = await nats.connect(
        url, nkeys_seed_str=agent._identity(), tls=agent._tls(),
        inbox_prefix=S.inbox_prefix(passport.rack_name), allow_reconnect=False, connect_timeout=3,
    )  # fmt: skip
    try:
        ack = await nc.jetstream().publish(S.msg(passport.rack_name, "g", "out"), b"still here", timeout=5)
        assert ack.seq >= 1
    finally:
        await nc.close()


async def test_snake_survives_a_killed_mixer_and_is_adopted_by_the_next(tmp_path):
    first = MixerProcess(tmp_path)
    second = None
    agent = probe = None
    try:
        first.wait_ready()
        agents, probe = await _enrolled_probe(first, tmp_path, racks=1)
        agent = agents[0]
        passport = agent.passport
        await probe.stop()
        probe = None
        pidfile = first.state / "snake" / "nats-server.pid"
        snake_pid = int(pidfile.read_text())
        url = f"tls://127.0.0.1:{first.snake_port}"

        first.proc.send_signal(signal.SIGKILL)  # what the OOM killer sends
        first.proc.wait(10)
        await asyncio.sleep(1.0)
        assert _alive(snake_pid), "nats-server died with the Mixer"
        # The Racks still have their bus: a guaranteed-lane publish is acked with no Mixer.
        await _lane_publish(url, passport, agent)

        generation = agent.generation
        second = first.again()
        second.wait_ready()
        # Adopted: the same nats-server serves on, the Rack never lost its connection.
        assert _alive(snake_pid), "the survivor was stopped instead of adopted"
        assert int(pidfile.read_text()) == snake_pid
        assert b"adopted pid" in second.log_path.read_bytes()
        assert agent.generation == generation and agent.state == "usable"
        await _lane_publish(url, passport, agent)
        # The adopted server is supervised: a config change reaches it, a stop stops it.
        second.stop()
        deadline = time.monotonic() + 15
        while _alive(snake_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not _alive(snake_pid), "the adopted nats-server was left running by stop"
        second = None
    finally:
        if probe is not None:
            await probe.stop()
        if agent is not None:
            await agent.stop()
        if second is not None:
            second.stop()
        first.stop()
        pid_path = tmp_path / "state" / "snake" / "nats-server.pid"
        if pid_path.exists():  # never leave a server behind, whatever failed
            pid = int(pid_path.read_text())
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
