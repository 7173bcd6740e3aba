"""TLS on io_tcp and io_iso8583, server and client, over real loopback sockets with
certificates made by the test (tests/tls_pki.py): one-way TLS, mTLS required (a client
without a certificate is refused before any frame is read), a client that trusts the wrong CA
or expects another name never connects, certificates rotated on disk apply to the next
handshake while an established connection keeps working, key files readable by others and
incomplete tls blocks are refused with the key named."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

import pytest
from helpers import free_port, running
from tls_pki import CA, write_pair

from fluxrig.errors import GearError
from fluxrig.gears.tcp_base import endpoint_problems
from fluxrig.net import tls as T


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA("fluxrig test CA"), CA("someone else's CA")
    out = {"dir": d, "ca_obj": ca, "ca": ca.write_ca(d / "ca.pem"), "other_ca": other.write_ca(d / "other.pem")}
    k, c = ca.issue("switch.test", dns=["switch.test"], ips=["127.0.0.1"])
    out["cert"], out["key"] = write_pair(k, c, d / "server.pem", d / "server.key")
    out["serial"] = c.serial_number
    k, c = ca.issue("acquirer-1", client=True)
    out["client_cert"], out["client_key"] = write_pair(k, c, d / "client.pem", d / "client.key")
    k, c = other.issue("switch.test", dns=["switch.test"], ips=["127.0.0.1"])
    out["rogue_cert"], out["rogue_key"] = write_pair(k, c, d / "rogue.pem", d / "rogue.key")
    return out


def echo_server(port, tls_yaml, gear="io_tcp"):
    extra = "delimiter_append: true, " if gear == "io_tcp" else ""
    return f"""
meta: {{version: '1'}}
gears:
  - name: gw
    type: {gear}
    config: {{mode: server, bind: "127.0.0.1:{port}", {extra}tls: {tls_yaml}}}
  - name: up
    type: map
    config: {{ops: [{{set: raw, value: "{{{{ raw | upper }}}}"}}]}}
wires:
  - {{from: gw.out, to: up.in}}
  - {{from: up.out, to: gw.in}}
"""


def client_ctx(pki, *, ca="ca", cert=False):
    ctx = ssl.create_default_context(cafile=pki[ca])
    if cert:
        ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    return ctx


async def line_over_tls(port, ctx, line=b"hello\n", name="switch.test"):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name), 5)
    try:
        w.write(line)
        await w.drain()
        return await asyncio.wait_for(r.readline(), 5), w.get_extra_info("ssl_object")
    finally:
        w.close()


async def test_io_tcp_server_tls_one_way(pki):
    port = free_port()
    tls = f'{{cert: "{pki["cert"]}", key: "{pki["key"]}"}}'
    async with running(echo_server(port, tls)) as rt:
        got, sslobj = await line_over_tls(port, client_ctx(pki))
        assert got == b"HELLO\n"
        assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        # plain TCP to a TLS port: no frame is ever processed
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"plain\n")
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert rt.gears["gw"].endpoint.counters["connections_total"] == 1


async def test_io_tcp_min_version_13_refuses_a_12_client(pki):
    port = free_port()
    tls = f'{{cert: "{pki["cert"]}", key: "{pki["key"]}", min_version: "1.3"}}'
    async with running(echo_server(port, tls)):
        ctx = client_ctx(pki)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await line_over_tls(port, ctx)
        got, sslobj = await line_over_tls(port, client_ctx(pki))
        assert sslobj.version() == "TLSv1.3"


async def test_io_iso8583_server_mtls_required(pki):
    port = free_port()
    tls = f'{{cert: "{pki["cert"]}", key: "{pki["key"]}", ca: "{pki["ca"]}", client_auth: required}}'
    frame = b"0800" + bytes.fromhex("8220000000000000") + b"0000000000000001" + b"0521123045123456301"
    text = echo_server(port, tls, gear="io_iso8583").replace("{{ raw | upper }}", "{{ raw }}")
    async with running(text) as rt:
        ctx = client_ctx(pki, cert=True)
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="switch.test")
        w.write(len(frame).to_bytes(2, "big") + frame)
        await w.drain()
        n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 5), "big")
        assert await r.readexactly(n) == frame
        w.close()
        # no client certificate: refused during the handshake, nothing read
        with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki), server_hostname="switch.test")
            w.write(len(frame).to_bytes(2, "big") + frame)
            await w.drain()
            await asyncio.wait_for(r.readexactly(2), 5)
        assert rt.gears["gw"].endpoint.counters["connections_total"] == 1


async def _tls_peer(pki, cert="cert", key="key", require_client=False):
    """A plain asyncio TLS server standing for the remote host a client gear dials."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[cert], pki[key])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    seen = []

    async def handle(r, w):
        seen.append(w.get_extra_info("ssl_object").getpeercert())
        w.write(b"welcome\n")
        await w.drain()
        await r.read()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return srv, srv.sockets[0].getsockname()[1], seen


def client_scenario(port, tls_yaml):
    return f"""
meta: {{version: '1'}}
gears:
  - name: link
    type: io_tcp
    config: {{mode: client, connect: "127.0.0.1:{port}", reconnect_wait: 50ms, reconnect_max: 200ms, tls: {tls_yaml}}}
  - name: sink
    type: sink
wires:
  - {{from: link.out, to: sink.in}}
"""


async def _wait(pred, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_io_tcp_client_mtls_and_hostname(pki):
    srv, port, seen = await _tls_peer(pki, require_client=True)
    tls = f'{{ca: "{pki["ca"]}", server_name: switch.test, cert: "{pki["client_cert"]}", key: "{pki["client_key"]}"}}'
    try:
        async with running(client_scenario(port, tls)) as rt:
            assert await _wait(lambda: rt.gears["link"].endpoint.connections)
            assert await _wait(lambda: seen)
            assert dict(x[0] for x in seen[0]["subject"])["commonName"] == "acquirer-1"
    finally:
        srv.close()


@pytest.mark.parametrize(
    "tls_keys, why",
    [
        ('ca: "{other_ca}", server_name: switch.test', "unable to get local issuer certificate"),
        ('ca: "{ca}", server_name: wrong.test', "Hostname mismatch"),
    ],
)
async def test_io_tcp_client_wrong_ca_or_name_never_connects(pki, caplog, tls_keys, why):
    srv, port, seen = await _tls_peer(pki)
    tls = "{" + tls_keys.format(**pki) + "}"
    try:
        with caplog.at_level(logging.WARNING):
            async with running(client_scenario(port, tls)) as rt:
                assert await _wait(lambda: "TLS handshake" in caplog.text)
                await asyncio.sleep(0.3)
                assert not rt.gears["link"].endpoint.connections
        assert why in caplog.text
        assert not seen
    finally:
        srv.close()


async def test_server_certificates_rotate_without_dropping_connections(pki, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "RECHECK_SECONDS", 0.0)
    cert, key = tmp_path / "s.pem", tmp_path / "s.key"
    k, c = pki["ca_obj"].issue("switch.test", dns=["switch.test"], ips=["127.0.0.1"])
    write_pair(k, c, cert, key)
    first = c.serial_number
    port = free_port()
    async with running(echo_server(port, f'{{cert: "{cert}", key: "{key}"}}')) as rt:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki), server_hostname="switch.test")
        w.write(b"one\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"ONE\n"
        k2, c2 = pki["ca_obj"].issue("switch.test", dns=["switch.test"], ips=["127.0.0.1"])
        write_pair(k2, c2, cert, key)
        os.utime(cert, ns=(1, 10**18))  # a new mtime even within the file system's granularity
        _got, sslobj = await line_over_tls(port, client_ctx(pki))
        from cryptography import x509

        served = x509.load_der_x509_certificate(sslobj.getpeercert(binary_form=True))
        assert served.serial_number == c2.serial_number != first
        w.write(b"still here\n")  # the connection made before the rotation is untouched
        assert await asyncio.wait_for(r.readline(), 5) == b"STILL HERE\n"
        w.close()
        assert rt.gears["gw"].metrics()["tls_reloads"] >= 1


async def test_rotation_to_broken_files_keeps_the_old_certificate(pki, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(T, "RECHECK_SECONDS", 0.0)
    cert, key = tmp_path / "s.pem", tmp_path / "s.key"
    k, c = pki["ca_obj"].issue("switch.test", dns=["switch.test"], ips=["127.0.0.1"])
    write_pair(k, c, cert, key)
    port = free_port()
    async with running(echo_server(port, f'{{cert: "{cert}", key: "{key}"}}')) as rt:
        cert.write_text("half a certificate")
        got, _ = await line_over_tls(port, client_ctx(pki))
        assert got == b"HELLO\n"
        assert rt.gears["gw"].metrics()["tls_reload_errors"] >= 1
        assert "do not load" in caplog.text


def test_key_readable_by_others_is_refused(pki, tmp_path):
    key = tmp_path / "open.key"
    key.write_bytes(open(pki["key"], "rb").read())
    os.chmod(key, 0o644)
    cfg = T.TlsConfig.parse({"cert": pki["cert"], "key": str(key)}, ".", "server")
    with pytest.raises(T.TlsError, match="readable or writable by others; chmod 600"):
        T.build_context(cfg)


def test_encrypted_key_needs_a_password_file(pki, tmp_path):
    k, c = pki["ca_obj"].issue("switch.test", dns=["switch.test"])
    cert, key = write_pair(k, c, tmp_path / "e.pem", tmp_path / "e.key", password=b"s3cret")
    with pytest.raises(T.TlsError):
        T.build_context(T.TlsConfig.parse({"cert": cert, "key": key}, ".", "server"))
    pw = tmp_path / "pw"
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"s3cret\n")
    os.close(fd)
    ctx = T.build_context(T.TlsConfig.parse({"cert": cert, "key": key, "key_password_file": str(pw)}, ".", "server"))
    assert isinstance(ctx, ssl.SSLContext)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"mode": "server", "bind": ":1", "tls": {"key": "k"}}, "tls.cert"),
        ({"mode": "server", "bind": ":1", "tls": {"cert": "c", "key": "k", "client_auth": "required"}}, "tls.ca"),
        ({"mode": "client", "connect": "h:1", "tls": {"client_auth": "required"}}, "tls.client_auth"),
        ({"mode": "client", "connect": "h:1", "tls": {"cert": "c"}}, "tls.cert"),
    ],
)
def test_tls_block_problems_name_the_key(config, key):
    assert key in [k for k, _ in endpoint_problems(config)]


async def test_verify_peer_false_is_a_logged_opt_in(pki, caplog):
    srv, port, seen = await _tls_peer(pki, cert="rogue_cert", key="rogue_key")
    try:
        with caplog.at_level(logging.WARNING):
            async with running(client_scenario(port, "{verify_peer: false}")) as rt:
                assert await _wait(lambda: rt.gears["link"].endpoint.connections)
        assert "NOT authenticated" in caplog.text
    finally:
        srv.close()


def test_gear_with_a_missing_certificate_is_a_bad_tls_error(tmp_path):
    from helpers import scenario_from_yaml

    from fluxrig.runtime import Runtime

    text = echo_server(free_port(), f'{{cert: "{tmp_path}/none.pem", key: "{tmp_path}/none.key"}}')
    with pytest.raises(Exception) as ei:
        Runtime(scenario_from_yaml(text)).build()
    err = ei.value
    while err is not None and not isinstance(err, GearError):
        err = err.__cause__ or err.__context__
    assert err is not None and err.reason == "bad_tls" and "none" in str(err)
