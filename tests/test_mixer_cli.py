"""The operator CLI (`fluxrig admin|scenario|logs|metrics|keys`) against a live Mixer, run as
real subprocesses; and `fluxrig-mixer` config handling."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import publish_telemetry, wait_for

from fluxrig.wire.telemetry import encode_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def fluxrig(mixer, *args, token=True, stdin=b""):
    env = dict(os.environ, PYTHONPATH=ROOT, FLUXRIG_API_URL=mixer.api_url)
    env.pop("FLUXRIG_API_TOKEN", None)
    if token:
        env["FLUXRIG_API_TOKEN"] = mixer.api_token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxrig.cli.main",
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_against_mixer(mixer, agent_factory, tmp_path):
    agent = await agent_factory("cli-rack")
    await wait_for(lambda: agent.passport is not None, what="enrolled")
    code, out, err = await fluxrig(mixer, "admin", "racks", "list")
    assert code == 0, err
    assert "cli-rack" in out and "pending" in out and out.startswith("NAME")
    code, out, err = await fluxrig(mixer, "admin", "racks", "approve", "cli-rack", "--json")
    assert code == 0 and json.loads(out)["status"] == "active"
    await wait_for(lambda: agent.status == "active", what="active")

    scen = tmp_path / "s.yaml"
    scen.write_text(
        "meta: {name: cli, version: '3'}\ngears:\n  - {name: gen, type: generator, config: {interval: 1s}}\n"
        "  - {name: sink, type: sink}\nwires: [{from: gen.out, to: sink.in}]\n"
    )
    code, out, err = await fluxrig(mixer, "scenario", "import", str(scen), "--activate")
    assert code == 0, err
    assert "cli 3@" in out and "reload sent to cli-rack" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: {name: bad}\ngears: [{name: x, type: nope}]\n")
    code, out, err = await fluxrig(mixer, "scenario", "import", str(bad))
    assert code == 2 and "meta.version" in err
    code, out, err = await fluxrig(mixer, "scenario", "list")
    assert code == 0 and "cli" in out and "True" in out
    await wait_for(lambda: agent.apply_state == "applied", what="applied")

    now = __import__("time").time_ns()
    await publish_telemetry(
        agent,
        "logs",
        encode_batch(
            "logs",
            "cli-rack",
            [{"id": 1, "ts": now, "severity": "error", "severity_text": "ERROR", "body": "disk on fire"}],
        ),
    )
    await publish_telemetry(
        agent,
        "metrics",
        encode_batch(
            "metrics", "cli-rack", [{"id": 1, "ts": now, "name": "flux.gear.errors", "type": "counter", "value": 2.0}]
        ),
    )
    await wait_for(
        lambda: mixer.ingest.stats["rows"].get("metrics") == 1 and mixer.ingest.stats["rows"].get("logs") == 1,
        what="ingest",
    )
    code, out, err = await fluxrig(mixer, "logs", "--min-level", "error")
    assert code == 0 and "disk on fire" in out and "ERROR" in out
    code, out, err = await fluxrig(mixer, "metrics", "--name", "flux.gear.errors", "--json")
    assert code == 0 and json.loads(out)[0]["value"] == 2.0

    code, out, err = await fluxrig(mixer, "admin", "racks", "suspend", "cli-rack")  # EOF at the prompt = no
    assert code == 4
    code, out, err = await fluxrig(mixer, "admin", "racks", "suspend", "cli-rack", "--force")
    assert code == 0 and "suspended" in out
    code, out, err = await fluxrig(mixer, "admin", "racks", "list", token=False)
    assert code == 1 and "401" in err

    # keys inspect: verifies against the pin beside the passport, never prints the secret.
    await wait_for(lambda: agent.status == "suspended", what="suspended passport stored")
    code, out, err = await fluxrig(mixer, "keys", "inspect", agent.store.path)
    assert code == 0, err
    assert "VERIFIED" in out and agent._identity() not in out  # the NKey seed never leaves the state dir


async def test_cli_unreachable_mixer(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, FLUXRIG_API_URL="http://127.0.0.1:9", FLUXRIG_API_TOKEN="x")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxrig.cli.main",
        "admin",
        "racks",
        "list",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 3 and b"cannot reach the Mixer" in err


def test_mixer_config_strict(tmp_path):
    import pytest
    from fluxrig_mixer.config import load_config

    from fluxrig.errors import ConfigError

    p = tmp_path / "m.toml"
    p.write_text("[api]\nprot = 8090\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p), environ={})
    assert e.value.key == "api.prot"
    p.write_text("[enrollment]\nheartbeat_interval = 30\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p), environ={})
    assert e.value.key == "enrollment.heartbeat_interval" and "unit" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, environ={"FLUXRIG_MIXER_SNAKE_PORTT": "1"})
    assert e.value.key == "snake.portt"
    cfg = load_config(None, environ={"FLUXRIG_MIXER_API_PORT": "9999"})
    assert cfg.api.port == 9999 and cfg.snake.port == 4222 and cfg.base.state_dir == "./data"
    from fluxrig_mixer.cli import main

    assert main(["config", "check", "-c", str(p)]) == 2
