"""The Rack's kill switch state machine (fluxrig/killswitch.py) without a network: commands
verified, the killed state and the nonces on disk, fail-closed on a damaged state file.
The target records what the Rack would have been asked to do (end to end with a real Rack:
test_mixer_killswitch.py)."""

from __future__ import annotations

import json
import os

import pytest

from fluxrig import ctrl as C
from fluxrig.killswitch import STATE_FILE, KillSwitch, RackKilled
from fluxrig.passport import ClusterKey

KEY = ClusterKey.generate()
PINS = [KEY.public_key]


class Recorder:
    """Stands in for the Rack's KillTarget methods and records the calls."""

    def __init__(self, gears=("gw", "codec")):
        self.calls: list[tuple] = []
        self.gears = set(gears)

    async def kill_gears(self, reason):
        self.calls.append(("kill", reason))

    async def revive_gears(self):
        self.calls.append(("revive",))

    async def stop_gear(self, name):
        self.calls.append(("stop", name))
        return name in self.gears

    def close_connection(self, gear, conn_id, reason):
        self.calls.append(("close", gear, conn_id, reason))
        return 1 if gear else len(self.gears)


def _cmd(cmd, **kw) -> bytes:
    return C.sign_command(KEY, C.new_command(cmd, "r-1", "edge", **kw))


async def _send(ks, cmd, data=None, rack_id="r-1", target=None, **kw):
    return await ks.handle(
        cmd, data if data is not None else _cmd(cmd, **kw), pins=PINS, rack_id=rack_id, target=target or Recorder()
    )


async def test_kill_persists_across_restart_until_revived(tmp_path):
    ks = KillSwitch(str(tmp_path))
    ks.load()
    assert ks.killed is None
    t = Recorder()
    out = await _send(ks, C.CMD_KILL, target=t, reason="incident")
    assert out["ok"] and out["detail"] == "killed" and t.calls == [("kill", "incident")]
    assert oct(os.stat(tmp_path / STATE_FILE).st_mode & 0o777) == "0o600"
    again = KillSwitch(str(tmp_path))
    again.load()
    assert again.killed["reason"] == "incident"
    with pytest.raises(RackKilled) as e:
        again.raise_if_killed()
    assert e.value.reason == "incident"
    # While killed, a gear stop has nothing to stop; a revive clears the state on disk.
    assert (await _send(again, C.CMD_GEAR_STOP, gear="gw"))["detail"].startswith("rack is killed")
    t2 = Recorder()
    assert (await _send(again, C.CMD_REVIVE, target=t2))["detail"] == "revived" and t2.calls == [("revive",)]
    third = KillSwitch(str(tmp_path))
    third.load()
    assert third.killed is None
    third.raise_if_killed()


async def test_nonces_survive_restart(tmp_path):
    ks = KillSwitch(str(tmp_path))
    ks.load()
    data = _cmd(C.CMD_CONN_CLOSE, conn_id="c1", gear="gw")
    assert (await _send(ks, C.CMD_CONN_CLOSE, data))["ok"]
    again = KillSwitch(str(tmp_path))
    again.load()
    out = await _send(again, C.CMD_CONN_CLOSE, data)
    assert not out["ok"] and out["detail"].startswith("refused (replayed)")
    assert again.refused_by == {"replayed": 1}
    assert out["nonce"] == C.peek_nonce(data).hex()


@pytest.mark.parametrize("content", [b"{not json", b'{"v": 99}', b'{"v": 1, "killed": "yes"}', b"\x00\xff"])
async def test_damaged_state_file_keeps_rack_killed(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    ks = KillSwitch(str(tmp_path))
    ks.load()
    assert ks.killed is not None and "unreadable" in ks.killed["reason"]
    with pytest.raises(RackKilled):
        ks.raise_if_killed()
    # A signed revive recovers it and rewrites a good file.
    assert (await _send(ks, C.CMD_REVIVE))["ok"]
    assert json.loads((tmp_path / STATE_FILE).read_bytes())["killed"] is None


async def test_gear_stop_conn_close_and_status(tmp_path):
    ks = KillSwitch(str(tmp_path))
    ks.load()
    t = Recorder()
    assert (await _send(ks, C.CMD_GEAR_STOP, target=t, gear="gw", reason="m"))["detail"] == "gear gw stopped"
    assert (await _send(ks, C.CMD_GEAR_STOP, target=t, gear="nope"))["detail"].startswith("no gear 'nope'")
    out = await _send(ks, C.CMD_CONN_CLOSE, target=t, conn_id="c9")
    assert out["detail"].startswith("conn.close c9 delivered to 2")
    assert ("close", "", "c9", "kill switch") in t.calls
    st = ks.status()
    assert st["stopped_gears"] == ["gw"] and st["accepted"] == 3 and len(st["recent"]) == 3
    # Revive on a live Rack restarts the stopped gears (the only way back short of a restart).
    out = await _send(ks, C.CMD_REVIVE, target=t)
    assert "restarted stopped gears gw" in out["detail"] and ks.stopped_gears == {}
    assert (await _send(ks, C.CMD_REVIVE, target=t))["detail"].startswith("not killed")


async def test_refusals_without_passport_or_pins(tmp_path):
    ks = KillSwitch(str(tmp_path))
    ks.load()
    t = Recorder()
    out = await _send(ks, C.CMD_KILL, rack_id=None, target=t)
    assert not out["ok"] and "no passport" in out["detail"]
    out = await ks.handle(C.CMD_KILL, _cmd(C.CMD_KILL), pins=[], rack_id="r-1", target=t)
    assert not out["ok"] and "(pin)" in out["detail"]
    assert t.calls == [] and ks.killed is None and not (tmp_path / STATE_FILE).exists()
    # Refusals are bounded in the heartbeat report.
    for _ in range(20):
        await _send(ks, C.CMD_KILL, b"junk", target=t)
    assert len(ks.status()["recent"]) == 8 and ks.refused == 22


async def test_target_failure_is_reported_not_raised(tmp_path):
    class Broken(Recorder):
        async def kill_gears(self, reason):
            raise RuntimeError("gear would not stop")

    ks = KillSwitch(str(tmp_path))
    ks.load()
    out = await _send(ks, C.CMD_KILL, target=Broken())
    assert not out["ok"] and "gear would not stop" in out["detail"]
    assert ks.killed is not None  # the state on disk says killed: a restart runs no gear
