"""Fixtures for the Mixer suites: a real Mixer (real nats-server child, real DuckDB file) on
free loopback ports in a temp state dir, and Rack agents pointed at it. Import with
`from mixer_fixtures import *` (tests/ is on sys.path through the root conftest)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from fluxrig_mixer.app import Mixer
from fluxrig_mixer.config import load_config

from fluxrig.agent.agent import AgentConfig, RackAgent
from fluxrig.rack_requests import ApplyScenario, RequestQueue
from fluxrig.wire import subjects as S

__all__ = [
    "bundle_for",
    "snake_toml",
    "rack_nats_options",
    "make_mixer",
    "mixer",
    "api",
    "agent_factory",
    "wait_for",
    "HEARTBEAT_S",
    "start_rack_process",
    "stop_rack_process",
    "run_cli",
    "snake_streams",
]

HEARTBEAT_S = 0.2


@contextlib.asynccontextmanager
async def snake_streams(tmp_path, **snake_overrides):
    """The Mixer's Snake alone (its nats-server supervisor, no Mixer) with the Mixer's streams,
    for tests that drive the ingest themselves: yields (supervisor, JetStream context).
    `snake_overrides`: `[snake]` keys without the prefix (telemetry_max_bytes=...)."""
    import nats
    from fluxrig_mixer.app import ensure_streams
    from fluxrig_mixer.snake import SnakeSupervisor

    snake = SnakeSupervisor(state_dir=str(tmp_path / "snake"), host="127.0.0.1", port=0)
    await snake.start([])
    nc = await nats.connect(snake.url, **snake.client_options())
    try:
        js = nc.jetstream()
        overrides = {f"snake.{k}": v for k, v in snake_overrides.items()}
        await ensure_streams(js, load_config(None, environ={}, overrides=overrides).snake)
        yield snake, js
    finally:
        await nc.close()
        await snake.stop()


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


def bundle_for(mixer, token: str | None = None, url: str | None = None, **token_kw) -> str:
    """An enrollment bundle (wire/bundle.py) for `mixer`, with `token` or a fresh single-use
    token (`token_kw`: uses, ttl, labels, rack_name); the URL is the Snake's loopback one
    unless `url` (e.g. a TCP proxy in front of it) is given."""
    if token is None:
        token, _ = mixer.tokens.create(**({"uses": 1} | token_kw))
    return mixer.enrollment_bundle(token, [url or mixer.snake.url])


def snake_toml(mixer, token: str | None = None, url: str | None = None, **token_kw) -> str:
    """The `[snake]` section of a joined Rack's fluxrig.toml: the bundle, nothing else (more
    snake keys may follow it)."""
    return f'[snake]\nenrollment_bundle = "{bundle_for(mixer, token, url, **token_kw)}"\n'


def rack_nats_options(agent) -> dict:
    """nats.connect keywords that authenticate exactly as this Rack (its NKey, its TLS trust)."""
    return {"nkeys_seed_str": agent._identity(), "tls": agent._tls()}


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
    """Stands in for the Rack behind an agent's RequestQueue: records the scenarios it is asked
    to apply (can be told to refuse) and answers every other request with an empty outcome."""

    def __init__(self):
        self.calls: list[tuple[dict, str]] = []
        self.refuse: str | None = None
        self.requests = RequestQueue()
        self._task: asyncio.Task | None = None

    def start(self) -> Applied:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _serve(self) -> None:
        while True:
            request = await self.requests.get()
            outcome = getattr(request, "outcome", None)
            if isinstance(request, ApplyScenario):
                self.calls.append((request.doc, request.version))
                if self.refuse:
                    outcome.set_exception(ValueError(self.refuse))
                    continue
            if outcome is not None and not outcome.done():
                outcome.set_result(None)


@pytest.fixture
async def agent_factory(tmp_path, mixer):
    agents: list[RackAgent] = []

    async def make(name: str, token: str | None = None, start: bool = True, **kw) -> RackAgent:
        cfg = AgentConfig(
            snake_url="",
            enrollment_bundle=kw.pop("enrollment_bundle", None) or bundle_for(mixer, token),
            state_dir=str(tmp_path / f"rack-{name}"),
            name=name,
            heartbeat_interval=HEARTBEAT_S,
            enrollment_interval=0.5,
            enrollment_timeout=kw.pop("enrollment_timeout", 5.0),
            reconnect_wait=0.2,
            **kw,
        )
        applied = Applied().start()
        agent = RackAgent(cfg, applied.requests)
        agent.applied = applied
        agents.append(agent)
        if start:
            await agent.start()
        return agent

    yield make
    for a in agents:
        await a.stop()
        await a.applied.stop()


async def publish_telemetry(agent, kind: str, batch: bytes, msg_id: str | None = None, timeout: float = 5.0):
    """Publish one telemetry batch through the agent's session (as the shipper does)."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    return await agent.publish(S.telemetry(agent.rack_name, kind), batch, headers=headers, timeout=timeout)


async def publish_as_rack(url: str, agent, subject: str, data: bytes, timeout: float = 2.0):
    """A JetStream publish with the Rack's own bus credentials, past the agent's own checks:
    what the Snake's permissions allow that user, and nothing else, decides."""
    import nats

    p = agent.passport
    nc = await nats.connect(url, **rack_nats_options(agent), inbox_prefix=S.inbox_prefix(p.rack_name),
                            allow_reconnect=False, connect_timeout=2)  # fmt: skip
    try:
        return await nc.jetstream().publish(subject, data, timeout=timeout)
    finally:
        await nc.close()


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
        sys.executable,
        "-m",
        "fluxrig.cli.main",
        "run",
        "-c",
        conf,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop_rack_process(proc, timeout: float = 20.0) -> bytes:
    """SIGTERM (the drain path), SIGKILL after `timeout`; returns what the Rack wrote to stderr."""
    import signal

    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    return err or b""


async def run_cli(mixer, *args, timeout: float = 30.0) -> tuple[int, str]:
    """`fluxrig <args>` against `mixer`'s API; (exit code, stdout+stderr). The token goes in a
    0600 file, as an operator passes it: never in argv (where a token that happens to begin
    with "-" is also taken for an option: argparse refused it, 1 run in ~60)."""
    import os
    import sys

    from helpers import ROOT

    token_file = os.path.join(mixer.state_dir, "cli-api-token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(mixer.api_token)
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxrig.cli.main",
        *args,
        "--api-url",
        mixer.api_url,
        "--api-token-file",
        token_file,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(cli.communicate(), timeout)
    return cli.returncode, out.decode()
