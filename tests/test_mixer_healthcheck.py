"""`fluxrig-mixer healthcheck` against a real in-process Mixer (real nats-server, DuckDB, API).

* Plain HTTP: exit 0 with the configuration's api.host/api.port (a wildcard host is asked on
  loopback) and with --url; exit 1 once the Mixer has stopped; exit 2 for api.port 0 without
  --url and for a bad --timeout.
* HTTPS: the answer must come from the holder of api.tls_cert_file (the pin); with another
  certificate in the configuration the same Mixer is unhealthy (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from urllib.parse import urlsplit

import pytest
from helpers import ROOT
from mixer_fixtures import make_mixer

pytestmark = pytest.mark.timeout(120)


async def _check(*args, env=None):
    env = dict(env or os.environ)
    env.setdefault("PYTHONPATH", f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'mixer')}")
    env.pop("FLUXRIG_MIXER_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxrig_mixer.cli",
        "healthcheck",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def _config(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


async def test_http_mixer_healthy_then_down(tmp_path):
    m = await make_mixer(tmp_path / "mixer")
    try:
        port = urlsplit(m.api_url).port
        cfg = _config(tmp_path, "m.toml", f'[api]\nhost = "0.0.0.0"\nport = {port}\n')
        code, out, err = await _check("-c", cfg, "--json")
        assert code == 0, err
        answer = json.loads(out)
        assert answer["status"] == "ok" and answer["snake"]["running"] is True
        code, out, err = await _check("--url", m.api_url + "/api/v1/health")
        assert code == 0 and out.startswith("healthy:"), (out, err)
    finally:
        await m.stop()
    code, _out, err = await _check("-c", cfg, "--timeout", "1s")
    assert code == 1 and "unhealthy" in err, err


async def test_bad_input_exits_2(tmp_path):
    cfg = _config(tmp_path, "zero.toml", "[api]\nport = 0\n")
    code, _out, err = await _check("-c", cfg)
    assert code == 2 and "api.port" in err, err
    code, _out, err = await _check("-c", cfg, "--timeout", "never")
    assert code == 2 and "--timeout" in err, err


async def test_https_answer_must_come_from_the_configured_certificate(tmp_path):
    from fluxrig_mixer.certs import init_certs

    good = init_certs(str(tmp_path / "good"), ["mixer.example"])
    other = init_certs(str(tmp_path / "other"), ["mixer.example"])
    m = await make_mixer(
        tmp_path / "mixer", **{"api.tls_cert_file": good["cert_file"], "api.tls_key_file": good["key_file"]}
    )
    try:
        assert m.api_url.startswith("https://")
        port = urlsplit(m.api_url).port
        pinned = _config(
            tmp_path,
            "tls.toml",
            f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
            f'tls_cert_file = "{good["cert_file"]}"\ntls_key_file = "{good["key_file"]}"\n',
        )
        code, out, err = await _check("-c", pinned)
        assert code == 0, err
        wrong = _config(
            tmp_path,
            "wrong.toml",
            f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
            f'tls_cert_file = "{other["cert_file"]}"\ntls_key_file = "{other["key_file"]}"\n',
        )
        code, _out, err = await _check("-c", wrong)
        assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
    finally:
        await m.stop()
