"""Fixtures for the Rack-group suites (issue 17): a real Mixer (nats-server child, DuckDB) and
real in-process Racks (agent, runtime, lanes) enrolled with labelled tokens, on loopback.
Import with `from group_fixtures import *`."""

from __future__ import annotations

import asyncio

from mixer_fixtures import snake_toml, wait_for

from fluxrig.config import load_config
from fluxrig.rack import Rack

__all__ = ["GroupRack", "group_rack_config", "activate_on"]


def group_rack_config(tmp_path, name: str, mixer, labels: dict | None = None, extra: str = ""):
    """A joined Rack's config: its own state dir, a single-use token carrying `labels`."""
    state = tmp_path / f"rack-{name}"
    conf = tmp_path / f"{name}.toml"
    conf.write_text(
        f'[base]\nname = "{name}"\nstate_dir = "{state}"\n'
        f'[rack]\nheartbeat_interval = "200ms"\ndrain_timeout = "3s"\n'
        f"[telemetry]\ndisabled = true\n{extra}"
        + snake_toml(mixer, labels=labels or {}, rack_name=name)
        + 'reconnect_wait = "200ms"\n'
    )
    return load_config(str(conf), environ={})


class GroupRack:
    """One in-process Rack (fluxrig.rack.Rack.run as a task)."""

    def __init__(self, config):
        self.config = config
        self.name = config.base.name
        self.rack: Rack | None = None
        self.task: asyncio.Task | None = None

    async def start(self, status: str = "active") -> Rack:
        self.rack = Rack(self.config)
        self.task = asyncio.get_running_loop().create_task(self.rack.run())
        await wait_for(
            lambda: self.task.done() or (self.rack.agent is not None and self.rack.agent.status == status),
            timeout=20,
            what=f"rack {self.name} {status}",
        )
        if self.task.done():
            self.task.result()
        return self.rack

    @property
    def gears(self) -> dict:
        return dict(self.rack.runtime.gears) if self.rack and self.rack.runtime else {}

    @property
    def serial(self) -> int:
        return self.rack.agent.passport.serial

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.rack.request_stop()
            await asyncio.wait_for(self.task, 20)
        self.task = None


async def activate_on(mixer, text: str, racks: list[GroupRack]) -> str:
    """Import and activate `text`; wait until every one of `racks` applied it."""
    stored, _ = mixer.scenarios.import_text(text)
    await mixer.controller.activate_scenario(stored)
    for r in racks:
        await wait_for(lambda r=r: r.rack.agent.applied_version == stored.version, timeout=20, what=f"{r.name} applied")
        assert r.rack.agent.apply_state == "applied", r.rack.agent.apply_reason
    return stored.version
