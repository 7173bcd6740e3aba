"""The control API is HTTPS wherever it is reachable from the network (issue 12), and a TLS
client that never finishes its handshake is cut off at api.header_timeout (issue 13).

Before: `api.host = "0.0.0.0"` served plain HTTP unless the operator also set `api.tls`, so
bearer tokens and console passwords crossed the network readable; a connection that opened TLS
and sent nothing was held for asyncio's default 60 s and not counted by the front door's cap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time

import httpx
import pytest
from mixer_fixtures import make_config, make_mixer

from fluxrig.errors import ConfigError

pytestmark = pytest.mark.mixer

HEADER_TIMEOUT_S = 1.0


@pytest.mark.parametrize(
    "overrides, https",
    [
        ({}, False),  # loopback: plain HTTP stays local
        ({"api.host": "::1"}, False),
        ({"api.host": "0.0.0.0"}, True),
        ({"api.host": "10.1.2.3"}, True),
        ({"api.host": "mixer.example"}, True),  # a name is never trusted to be local
        ({"api.host": "0.0.0.0", "api.insecure_plaintext": True}, False),
        ({"api.tls": True}, True),
    ],
)
def test_https_unless_loopback_or_a_loud_opt_out(tmp_path, overrides, https):
    assert make_config(tmp_path, **overrides).api_https is https


def test_plaintext_opt_out_contradicting_tls_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, **{"api.tls": True, "api.insecure_plaintext": True})
    assert err.value.key == "api.insecure_plaintext"


async def test_api_on_every_address_serves_https_verified_by_the_mixer_ca(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"api.host": "0.0.0.0"})
    try:
        assert m.api_url.startswith("https://127.0.0.1:")
        ca = os.path.join(m.state_dir, "certs", "ca.pem")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca)) as c:
            assert (await c.get(f"{m.api_url}/api/v1/health")).status_code == 200
        # The same port in plain HTTP does not answer an API request.
        async with httpx.AsyncClient() as c:
            with pytest.raises(httpx.HTTPError):
                await c.get(f"http://127.0.0.1:{m.api_port}/api/v1/health")
    finally:
        await m.stop()


async def test_plaintext_on_the_network_is_logged_loudly(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fluxrig.mixer")
    m = await make_mixer(tmp_path / "mixer", **{"api.host": "0.0.0.0", "api.insecure_plaintext": True})
    try:
        assert m.api_url.startswith("http://")
        assert any("INSECURE" in r.getMessage() and "PLAIN HTTP" in r.getMessage() for r in caplog.records)
    finally:
        await m.stop()


async def test_a_stalled_tls_handshake_is_cut_off_at_the_header_timeout(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"api.tls": True, "api.header_timeout": HEADER_TIMEOUT_S})
    try:
        stalled = [await asyncio.open_connection("127.0.0.1", m.api_port) for _ in range(20)]
        t0 = time.monotonic()
        ends = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in stalled)), timeout=30)
        took = time.monotonic() - t0
        assert ends == [b""] * 20  # closed by the Mixer, nothing sent to a client that said nothing
        assert took < HEADER_TIMEOUT_S + 5, f"stalled TLS handshakes held {took:.1f}s (asyncio's default is 60 s)"
        for _, w in stalled:
            w.close()
        # ... and the API still answers a client that does finish its handshake.
        ca = os.path.join(m.state_dir, "certs", "ca.pem")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca)) as c:
            assert (await c.get(f"{m.api_url}/api/v1/health")).status_code == 200
    finally:
        await m.stop()
