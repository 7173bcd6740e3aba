"""Fixtures for the Mixer suites: a real Mixer (real nats-server child, real DuckDB file) on
free loopback ports in a temp state dir, and Rack agents pointed at it. Import with
`from mixer_fixtures import *` (tests/ is on sys.path through the root conftest)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from fluxrig.agent.agent import AgentConfig, RackAgent
from fluxrig_mixer.app import Mixer
from fluxrig_mixer.config import load_config

__all__ = ["make_mixer", "mixer", "api", "agent_factory", "wait_for", "HEARTBEAT_S", "start_rack_process",
           "stop_rack_process"]

HEARTBEAT_S = 0.2


def make_config(state_dir, **overrides):
    base = {
        "base.state_dir": str(state_dir),
        "api.host": "127.0.0.1",
        "api.port": 0,
        "snake.host": "127.0.0.1",
        "snake.port": 0,
        "enrollment.heartbeat_interval": HEARTBEAT_S,
        "telemetry.flush_interval": 0.05,
    }
    base.update(overrides)
    return load_config(None, environ={}, overrides=base)


async def make_mixer(state_dir, **overrides) -> Mixer:
    m = Mixer(make_config(state_dir, **overrides), announce=lambda text: None)
    await m.start()
    return m


@pytest.fixture
async def mixer(tmp_path):
    m = await make_mixer(tmp_path / "mixer")
    try:
        yield m
    finally:
        await m.stop()


@pytest.fixture
async def api(mixer):
    async with httpx.AsyncClient(
        base_url=mixer.api_url, headers={"Authorization": f"Bearer {mixer.api_token}"}, timeout=10
    ) as client:
        yield client


class Applied:
    """Records what the agent asked the runtime to apply; can be told to refuse."""

    def __init__(self):
        self.calls: list[tuple[dict, str]] = []
        self.refuse: str | None = None

    async def __call__(self, doc: dict, version: str) -> None:
        self.calls.append((doc, version))
        if self.refuse:
            raise ValueError(self.refuse)


@pytest.fixture
async def agent_factory(tmp_path, mixer):
    agents: list[RackAgent] = []

    async def make(name: str, token: str | None = None, start: bool = True, **kw) -> RackAgent:
        cfg = AgentConfig(
            snake_url=mixer.snake.url,
            bootstrap_token=mixer.bootstrap_token if token is None else token,
            state_dir=str(tmp_path / f"rack-{name}"),
            name=name,
            heartbeat_interval=HEARTBEAT_S,
            enrollment_interval=0.5,
            enrollment_timeout=kw.pop("enrollment_timeout", 5.0),
            reconnect_wait=0.2,
            **kw,
        )
        applied = Applied()
        agent = RackAgent(cfg, applied)
        agent.applied = applied
        agents.append(agent)
        if start:
            await agent.start()
        return agent

    yield make
    for a in agents:
        await a.stop()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` (sync or async) until truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def start_rack_process(conf: str, env: dict | None = None):
    """`fluxrig run -c conf` as a subprocess (stderr captured, read it with stop_rack_process)."""
    import os
    import sys

    from helpers import ROOT

    env = dict(env or os.environ, PYTHONPATH=ROOT)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fluxrig.cli.main", "run", "-c", conf, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def stop_rack_process(proc, timeout: float = 20.0) -> bytes:
    """SIGTERM (the drain path), SIGKILL after `timeout`; returns what the Rack wrote to stderr."""
    import signal

    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    return err or b""
