"""Trust on the Snake (issue 12), checked from outside with nats-py and plain sockets: TLS by
default, one NKey identity per Rack, enrollment bundles instead of trust on first use, tokens
that are counted, expire and are revoked, removed Racks that stay out, reused names that
inherit nothing, and state dirs nobody else can read."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import nats
import pytest
from fluxrig_mixer.certs import init_certs, issue_client_cert
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import HEARTBEAT_S, Applied, bundle_for, make_mixer, rack_nats_options, wait_for

from fluxrig.agent.agent import AgentConfig, RackAgent
from fluxrig.errors import ConfigError
from fluxrig.wire import identity as I
from fluxrig.wire import messages as W
from fluxrig.wire import subjects as S
from fluxrig.wire.bundle import Bundle, BundleError, decode_bundle, encode_bundle, read_bundle
from fluxrig.wire.vocab import HelloStatus

pytestmark = pytest.mark.mixer


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    return host, int(port)


async def _hello(mixer, token: str, name: str, seed: str | None = None, sig_seed: str | None = None):
    """Send one Hello from outside (no credentials: the enroll identity) and decode the reply."""
    seed = seed or I.new_user_seed()
    sk, pk = W.new_reply_keypair()
    hello = W.Hello(token, name, pk, "test", "h", {"tier": "gold"}, nkey=I.public_key(seed),
                    nkey_sig=I.prove(sig_seed or seed, pk))  # fmt: skip
    nc = await nats.connect(mixer.snake.url, tls=mixer.snake.client_tls(), inbox_prefix=S.ENROLL_INBOX,
                            allow_reconnect=False, connect_timeout=2)  # fmt: skip
    try:
        msg = await nc.request(S.HELLO, hello.encode(), timeout=5)
    finally:
        await nc.close()
    return W.HelloReply.decode(msg.data)


def _agent(tmp_path, name: str, bundle: str, **kw) -> tuple[RackAgent, Applied]:
    applied = Applied().start()
    cfg = AgentConfig(
        snake_url=kw.pop("snake_url", ""),
        enrollment_bundle=bundle,
        state_dir=str(tmp_path / f"rack-{name}"),
        name=name,
        heartbeat_interval=HEARTBEAT_S,
        enrollment_interval=0.5,
        enrollment_timeout=kw.pop("enrollment_timeout", 2.0),
        reconnect_wait=0.2,
        **kw,
    )
    return RackAgent(cfg, applied.requests), applied


# -- TLS by default -------------------------------------------------------------------------------


async def test_plain_text_client_is_refused(mixer):
    assert mixer.snake.url.startswith("tls://") and mixer.ca_sha256
    host, port = _host_port(mixer.snake.url)
    # A plain socket: the server announces TLS and drops a client that talks plain text.
    with socket.create_connection((host, port), timeout=5) as s:
        info = s.recv(4096)
        assert info.startswith(b"INFO ") and b'"tls_required":true' in info
        s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        s.settimeout(5)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, TimeoutError, OSError):
            pass
    assert b"PONG" not in got
    # nats-py without our CA (the system store) cannot verify the Snake: refused too.
    with pytest.raises(Exception):
        await nats.connect(mixer.snake.url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
    # The generated config has a tls block and no password anywhere.
    with open(mixer.snake.conf_path) as fh:
        conf = fh.read()
    assert "tls {" in conf and "password" not in conf and "verify" not in conf


async def test_rack_with_a_wrong_ca_fails_closed(mixer, tmp_path):
    other = init_certs(str(tmp_path / "other-ca"))
    with open(other["ca_file"]) as fh:
        other_pem = fh.read()
    real = read_bundle(bundle_for(mixer))
    from fluxrig.wire.bundle import ca_der_sha256

    forged = encode_bundle(Bundle(real.urls, other_pem, ca_der_sha256(other_pem), real.mixer_keys, real.token))
    agent, applied = _agent(tmp_path, "wrong-ca", forged)
    await agent.start()
    try:
        await wait_for(lambda: "TLS" in agent.last_error, timeout=10, what="the TLS refusal")
        assert "does not verify" in agent.last_error and "enrollment bundle" in agent.last_error
        assert agent.passport is None and mixer.registry.list() == []
    finally:
        await agent.stop()
        await applied.stop()


def test_bundle_checks_its_fingerprint_and_fields(tmp_path):
    certs = init_certs(str(tmp_path / "c"))
    with open(certs["ca_file"]) as fh:
        pem = fh.read()
    from fluxrig.wire.bundle import ca_der_sha256

    good = Bundle(("tls://127.0.0.1:4222",), pem, ca_der_sha256(pem), ("ab" * 32,), "frt_x_y")
    assert decode_bundle(encode_bundle(good)).token == "frt_x_y"
    bad_fp = Bundle(good.urls, pem, "00" * 32, good.mixer_keys, "t")
    with pytest.raises(BundleError, match="ca_sha256"):
        decode_bundle(encode_bundle(bad_fp))
    with pytest.raises(BundleError, match="mixer_keys"):
        decode_bundle(encode_bundle(Bundle(good.urls, pem, good.ca_sha256, ("nothex",), "t")))
    with pytest.raises(BundleError, match="fluxrig-enroll-v1"):
        decode_bundle("hello")
    with pytest.raises(BundleError, match="truncated"):
        decode_bundle(encode_bundle(good)[:-40] + "!!")


async def test_mtls_end_to_end_mixer_client_included(tmp_path):
    """tls_verify = true: the Mixer's own client presents its certificate (it used to hang), a
    Rack with a client certificate enrolls and runs, one without is refused."""
    m = await make_mixer(tmp_path / "m", **{"snake.tls_verify": True, "enrollment.auto_adopt": True})
    try:
        assert m.nc.is_connected
        with open(m.snake.conf_path) as fh:
            assert "verify: true" in fh.read()
        cert = issue_client_cert(os.path.join(m.state_dir, "certs"), "gw-1", out_dir=str(tmp_path / "gw1"))
        agent, applied = _agent(tmp_path, "gw-1", bundle_for(m), tls_cert_file=cert["cert_file"],
                                tls_key_file=cert["key_file"])  # fmt: skip
        await agent.start()
        try:
            await wait_for(lambda: agent.status == "active" and agent.connected.is_set(), what="rack over mTLS")
        finally:
            await agent.stop()
            await applied.stop()
        bare, applied2 = _agent(tmp_path, "bare", bundle_for(m))
        await bare.start()
        try:
            await wait_for(lambda: bare.last_error, timeout=10, what="the refusal of a Rack without a certificate")
            assert bare.passport is None
        finally:
            await bare.stop()
            await applied2.stop()
        assert [r.name for r in m.registry.list()] == ["gw-1"]
    finally:
        await m.stop()


async def test_insecure_plaintext_is_an_explicit_logged_opt_in(tmp_path, caplog):
    m = await make_mixer(tmp_path / "m", **{"snake.insecure_plaintext": True})
    try:
        assert m.snake.url.startswith("nats://") and m.tls is None
        assert any("PLAIN TEXT" in r.getMessage() for r in caplog.records)
        # A Rack refuses a nats:// URL unless it opts in too.
        agent, applied = _agent(tmp_path, "plain", "", snake_url=m.snake.url, bootstrap_token="x",
                                mixer_public_keys=[m.key.public_key])  # fmt: skip
        await agent.start()
        try:
            await wait_for(lambda: "plain-text" in agent.last_error, timeout=10, what="the Rack's refusal")
        finally:
            await agent.stop()
            await applied.stop()
    finally:
        await m.stop()


# -- identities -------------------------------------------------------------------------------------


async def test_one_racks_key_cannot_connect_as_another(mixer, api, agent_factory):
    a = await agent_factory("rack-a")
    b = await agent_factory("rack-b")
    await wait_for(lambda: a.passport is not None and b.passport is not None, what="both enrolled")
    for name in ("rack-a", "rack-b"):
        assert (await api.post(f"/api/v1/racks/{name}/approve", json={})).status_code == 200
    assert a.nkey != b.nkey and a.passport.bus_user == a.nkey and a.passport.bus_password == ""
    # rack-a's key with rack-b's inbox prefix is still rack-a: every rack-b subject is refused.
    errors = []

    async def on_error(exc):
        errors.append(str(exc))

    nc = await nats.connect(mixer.snake.url, **rack_nats_options(a), inbox_prefix="_INBOX_rack-b",
                            error_cb=on_error, allow_reconnect=False)  # fmt: skip
    try:
        await nc.subscribe("flux.ctrl.rack-b.>")
        await nc.publish(S.heartbeat("rack-b"), b"x")
        await nc.flush()
        await wait_for(lambda: len(errors) >= 2, timeout=5, what="violations")
    finally:
        await nc.close()
    # An NKey the Mixer never saw: not even a connection.
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(mixer.snake.url, nkeys_seed_str=I.new_user_seed(), tls=mixer.snake.client_tls(),
                           allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)  # fmt: skip
    # A Hello naming rack-a's public key without its seed: refused, nothing registered.
    token, _ = mixer.tokens.create(uses=1)
    reply = await _hello(mixer, token, "thief", seed=a._identity(), sig_seed=I.new_user_seed())
    assert reply.status is HelloStatus.DENIED and "possession" in reply.message
    assert sorted(r.name for r in mixer.registry.list()) == ["rack-a", "rack-b"]
    # Nothing secret in the registry file or the Snake's config: public keys only.
    with open(mixer.snake.conf_path) as fh:
        conf = fh.read()
    assert a.nkey in conf and a._identity() not in conf and "password" not in conf
    rows = mixer.db.conn.execute("SELECT bus_user, bus_password FROM racks").fetchall()
    assert {r[1] for r in rows} == {""} and all(r[0].startswith("U") for r in rows)


# -- enrollment: bundles, tokens ----------------------------------------------------------------------


async def test_no_pinned_key_refuses_to_enroll_unless_tofu(mixer, tmp_path, caplog):
    token, _ = mixer.tokens.create(uses=2)
    root_ca = os.path.join(mixer.state_dir, "certs", "ca.pem")
    agent, applied = _agent(tmp_path, "tofu-no", "", snake_url=mixer.snake.url, bootstrap_token=token,
                            root_ca_file=root_ca)  # fmt: skip
    await agent.start()
    try:
        await wait_for(lambda: "no pinned Mixer key" in agent.last_error, timeout=10, what="the refusal")
        assert mixer.registry.list() == []
    finally:
        await agent.stop()
        await applied.stop()
    agent, applied = _agent(tmp_path, "tofu-yes", "", snake_url=mixer.snake.url, bootstrap_token=token,
                            root_ca_file=root_ca, trust_on_first_use=True)  # fmt: skip
    await agent.start()
    try:
        await wait_for(lambda: agent.passport is not None, what="enrolled with trust on first use")
        assert any("trust_on_first_use" in r.getMessage() for r in caplog.records)
    finally:
        await agent.stop()
        await applied.stop()


async def test_spent_expired_revoked_tokens_are_denied_and_register_nothing(mixer):
    once, _ = mixer.tokens.create(uses=1, labels={"site": "lab"}, rack_name="named-by-token")
    ok = await _hello(mixer, once, "whatever")
    assert ok.status is HelloStatus.PENDING and ok.rack_name == "named-by-token"
    row = mixer.registry.get("named-by-token")
    assert row.labels == {"site": "lab"}  # from the token; the Hello's {"tier": "gold"} is ignored
    spent = await _hello(mixer, once, "again")
    assert spent.status is HelloStatus.DENIED and "spent" in spent.message
    short, _ = mixer.tokens.create(uses=5, ttl=0.3)
    await asyncio.sleep(0.5)
    expired = await _hello(mixer, short, "late")
    assert expired.status is HelloStatus.DENIED and "expired" in expired.message
    revoked, rec = mixer.tokens.create(uses=0)
    mixer.tokens.revoke(rec["id"])
    r = await _hello(mixer, revoked, "revoked")
    assert r.status is HelloStatus.DENIED and "revoked" in r.message
    unknown = await _hello(mixer, "frt_nope_x", "guess")
    assert unknown.status is HelloStatus.DENIED
    # The first-start token is single-use by default: the fixture's Mixer has not spent it yet.
    first = await _hello(mixer, mixer.bootstrap_token, "first")
    second = await _hello(mixer, mixer.bootstrap_token, "second")
    assert first.status is HelloStatus.PENDING and second.status is HelloStatus.DENIED
    assert sorted(r.name for r in mixer.registry.list()) == ["first", "named-by-token"]
    listed = {t["id"]: t for t in mixer.tokens.list()}
    assert listed[rec["id"]]["state"] == "revoked" and listed["first-start"]["state"] == "spent"
    with open(mixer.tokens.path) as fh:
        stored = fh.read()
    assert once not in stored and mixer.bootstrap_token not in stored  # hashed only


def test_token_cli_options_are_checked(tmp_path):
    from fluxrig_mixer.tokens import TokenStore, parse_labels

    store = TokenStore(str(tmp_path))
    with pytest.raises(ConfigError, match="--uses"):
        store.create(uses=-1)
    with pytest.raises(ConfigError, match="--name"):
        store.create(rack_name="Bad Name")
    with pytest.raises(ConfigError, match="--labels"):
        parse_labels("novalue")
    assert parse_labels(["a=1,b=2", "c=3"]) == {"a": "1", "b": "2", "c": "3"}
    token, rec = store.create(uses=2)
    assert store.consume(token).refused is None and store.consume(token).refused is None
    assert "spent" in store.consume(token).refused
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


# -- removal, reused names ---------------------------------------------------------------------------


async def test_removed_rack_stays_out(mixer, api, agent_factory):
    agent = await agent_factory("gone")
    await wait_for(lambda: agent.passport is not None, what="enrolled")
    await api.post("/api/v1/racks/gone/approve", json={})
    await wait_for(lambda: agent.status == "active" and agent.connected.is_set(), what="active")
    seed = agent._identity()
    assert (await api.delete("/api/v1/racks/gone")).json()["status"] == "removed"
    await wait_for(lambda: agent.removed, timeout=10, what="the Rack marked itself removed")
    assert os.path.exists(agent.removed_path)
    # Even with a fresh valid token, that identity is refused, and nothing is registered.
    token, _ = mixer.tokens.create(uses=1)
    reply = await _hello(mixer, token, "gone", seed=seed)
    assert reply.status is HelloStatus.REMOVED
    assert mixer.registry.list() == [] and mixer.controller.counters["hello_removed"] >= 1
    # And its key no longer connects to the Snake.
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(mixer.snake.url, nkeys_seed_str=seed, tls=mixer.snake.client_tls(),
                           allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)  # fmt: skip
    # A restarted agent with the same state dir does not try again.
    await agent.stop()
    hellos = mixer.controller.counters["hello_removed"] + mixer.controller.counters["hello_ok"]
    await agent.start()
    await asyncio.sleep(1.0)
    assert agent.removed and agent.passport is None
    assert mixer.controller.counters["hello_removed"] + mixer.controller.counters["hello_ok"] == hellos


LANE_SCENARIO = """
meta: {name: lane, version: '%s'}
racks: [{name: src}, {name: dst}]
gears:
  - {name: gen, type: generator, deploy: src, config: {interval: 1s}}
  - {name: sink, type: sink, deploy: dst}
wires: [{from: gen.out, to: sink.in}]
"""


async def test_reused_name_gets_none_of_the_old_racks_guaranteed_messages(mixer, api, agent_factory, tmp_path):
    src = await agent_factory("src")
    old = await agent_factory("dst")
    await wait_for(lambda: old.passport is not None and src.passport is not None, what="src and dst enrolled")
    await api.post("/api/v1/racks/dst/approve", json={})
    stored, _ = mixer.scenarios.import_text(LANE_SCENARIO % "1")
    await mixer.controller.activate_scenario(stored)
    consumer = S.rack_consumer("dst")
    await wait_for(lambda: "in-dst" in mixer.controller.lanes.current, what="the consumer into dst")
    # Messages for the old dst, never fetched by it.
    for i in range(5):
        await mixer.js.publish(S.msg("src", "gen", "out"), f"old-{i}".encode())

    async def five_pending():  # the server counts a consumer's pending messages as it gets to them
        return (await mixer.js.consumer_info(S.STREAM_MSG, consumer)).num_pending == 5

    await wait_for(five_pending, timeout=5, what="5 messages pending for the old dst")
    await api.delete("/api/v1/racks/dst")
    await wait_for(lambda: old.removed, what="old dst removed")
    await old.stop()
    names = [c.name for c in await mixer.js.consumers_info(S.STREAM_MSG)]
    assert consumer not in names  # deleted with the identity, not left for the next holder
    # A new identity takes the name: its consumer starts after the removal.
    new, applied = _agent(tmp_path / "elsewhere", "dst", bundle_for(mixer))  # another machine
    await new.start()
    try:
        await wait_for(lambda: new.passport is not None, what="new dst enrolled")
        assert new.nkey != old.nkey and new.passport.rack_name == "dst"
        await api.post("/api/v1/racks/dst/approve", json={})
        await mixer.controller.lanes.sync()
        await mixer.js.publish(S.msg("src", "gen", "out"), b"new-0")
        sub = await mixer.js.pull_subscribe_bind(consumer=consumer, stream=S.STREAM_MSG)
        got = [m.data for m in await sub.fetch(10, timeout=2)]
        assert got == [b"new-0"]
    finally:
        await new.stop()
        await applied.stop()


# -- files and processes -------------------------------------------------------------------------------


def _readable_by_others(root: str) -> list[str]:
    bad = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for p in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                bad.append(f"{oct(st.st_mode & 0o777)} {p}")
    return bad


async def test_no_file_under_either_state_dir_is_readable_by_others(tmp_path):
    state = tmp_path / "mixer"
    # A state dir made earlier by another tool, group/world-readable: fixed at start.
    os.makedirs(state / "certs", mode=0o755)
    os.chmod(state, 0o755)
    (state / "notes.txt").write_text("x")
    os.chmod(state / "notes.txt", 0o644)
    old_umask = os.umask(0o022)
    try:
        m = await make_mixer(state, **{"enrollment.auto_adopt": True})
        try:
            rack_state = tmp_path / "rack-perm"
            os.makedirs(rack_state / "wal", mode=0o755)
            os.chmod(rack_state, 0o755)
            (rack_state / "wal" / "old-segment").write_bytes(b"x")
            os.chmod(rack_state / "wal" / "old-segment", 0o644)
            from fluxrig.fileutil import secure_tree

            secure_tree(str(rack_state))  # what Rack.run does at every start (fluxrig/rack.py)
            agent, applied = _agent(tmp_path, "perm", bundle_for(m))
            await agent.start()
            try:
                await wait_for(lambda: agent.status == "active", what="active")
            finally:
                await agent.stop()
                await applied.stop()
            assert _readable_by_others(str(state)) == []
            assert _readable_by_others(str(rack_state)) == []
            assert os.path.exists(rack_state / "identity.nkey") and os.path.exists(rack_state / "rack.flux")
        finally:
            await m.stop()
    finally:
        os.umask(old_umask)


async def test_first_start_banner_names_paths_never_the_token(tmp_path):
    lines: list[str] = []
    from fluxrig_mixer.app import Mixer
    from mixer_fixtures import make_config

    m = Mixer(make_config(tmp_path / "m"), announce=lines.append)
    await m.start()
    try:
        text = "\n".join(lines)
        assert m.bundle_path in text and m.ca_sha256 in text
        assert m.bootstrap_token and m.bootstrap_token not in text
        assert read_bundle(m.bundle_path).token == m.bootstrap_token
        assert stat.S_IMODE(os.stat(m.bundle_path).st_mode) == 0o600
    finally:
        await m.stop()


async def _cli(*args: str, env: dict) -> tuple[int, str, str]:
    import sys

    from helpers import ROOT

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fluxrig_mixer.cli", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_tokens_cli_while_the_mixer_runs(mixer, tmp_path):
    from helpers import ROOT

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "mixer")]),
        FLUXRIG_MIXER_BASE_STATE_DIR=mixer.state_dir,
    )
    bundle_file = tmp_path / "gw.bundle"
    code, out, err = await _cli("tokens", "create", "--uses", "1", "--ttl", "1h", "--labels", "site=lab",
                                "--name", "gw-cli", "--bundle", str(bundle_file), env=env)  # fmt: skip
    assert code == 0, err
    assert stat.S_IMODE(os.stat(bundle_file).st_mode) == 0o600
    b = read_bundle(str(bundle_file))
    assert b.token and b.token not in out + err and b.urls == (mixer.snake.url,)
    agent, applied = _agent(tmp_path, "whatever", str(bundle_file))
    await agent.start()
    try:
        await wait_for(lambda: agent.passport is not None, what="enrolled with the CLI's bundle")
        assert agent.passport.rack_name == "gw-cli" and mixer.registry.get("gw-cli").labels == {"site": "lab"}
    finally:
        await agent.stop()
        await applied.stop()
    code, out, err = await _cli("tokens", "list", "--json", env=env)
    assert code == 0, err
    rows = {r["id"]: r for r in __import__("json").loads(out)}
    created = [r for r in rows.values() if r["rack_name"] == "gw-cli"][0]
    assert created["state"] == "spent" and created["racks"] == ["whatever"]
    code, out, err = await _cli("tokens", "revoke", "first-start", env=env)
    assert code == 0 and "revoked" in out
    reply = await _hello(mixer, mixer.bootstrap_token, "late")
    assert reply.status is HelloStatus.DENIED and "revoked" in reply.message
    code, out, err = await _cli("tokens", "create", "--labels", "bad", env=env)
    assert code == 2 and "--labels" in err
