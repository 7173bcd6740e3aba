"""A Rack's failed WAL as the Mixer shows it (issue 13: "a metric and a heartbeat flag
meanwhile"): a heartbeat whose storage flag names a WAL gives one ERROR line, the flag in the
console's fleet row and the count in /metrics; the next heartbeat without it clears both and
says so once. (A Rack's WALs failing and healing on a real full disk are test_mixer_wal_enospc.py,
where a whole Rack's state dir on a full tmpfs flags its heartbeat at a real Mixer and clears it
once space returns: test_lane_wal_full_disk_holds_the_emitter_heals_and_delivers_everything_once.)"""

from __future__ import annotations

import logging

import httpx
import pytest
from fluxrig_mixer.api.feed import fleet_row
from mixer_fixtures import *  # noqa: F401,F403 (the mixer fixture)

from fluxrig.wire import identity as I
from fluxrig.wire import messages as W
from fluxrig.wire import subjects as S

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(60)]


def beat(failed: tuple[str, ...]) -> bytes:
    storage = {"failed": list(failed), "telemetry": {"failed": "telemetry" in failed, "refused_records": 12}}
    return W.Heartbeat(serial=0, stats={"storage": storage}, storage_failed=failed).encode()


async def test_a_failed_wal_in_a_heartbeat_is_shown_counted_and_cleared(mixer, caplog):
    caplog.set_level(logging.WARNING, logger="fluxrig.mixer.controller")
    rack = await mixer.controller.state.create(
        "edge", host="gw", version="0.1.0", labels={}, adopted=True, nkey=I.public_key(I.new_user_seed())
    )
    api = httpx.AsyncClient(base_url=mixer.api_url, headers={"Authorization": f"Bearer {mixer.api_token}"})

    async def failed_count() -> dict:
        text = (await api.get("/metrics")).text
        return {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("fluxrig_mixer_racks_storage_failed{")
        }

    try:
        assert await failed_count() == {"telemetry": 0, "lanes": 0}
        for _ in range(3):  # said once, however many heartbeats carry it
            await mixer.controller.handle_heartbeat(S.heartbeat("edge"), beat(("telemetry",)))
        assert fleet_row(mixer.registry.get(rack.rack_id))["storage_failed"] == ["telemetry"]
        assert await failed_count() == {"telemetry": 1, "lanes": 0}
        said = [r.getMessage() for r in caplog.records if "edge" in r.getMessage()]
        assert said == ["rack edge: its telemetry WAL refuses writes (storage full or failing on the Rack); "
                        "it heals by itself once space returns"], said  # fmt: skip
        await mixer.controller.handle_heartbeat(S.heartbeat("edge"), beat(()))
        assert fleet_row(mixer.registry.get(rack.rack_id))["storage_failed"] == []
        assert await failed_count() == {"telemetry": 0, "lanes": 0}
        assert [r.levelname for r in caplog.records if "edge" in r.getMessage()] == ["ERROR", "WARNING"]
        assert "its telemetry WAL takes writes again" in caplog.records[-1].getMessage()
    finally:
        await api.aclose()
