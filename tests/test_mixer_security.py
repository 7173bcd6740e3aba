"""Isolation and trust: a Rack's bus user cannot touch another Rack's subjects (the server
refuses), tampered or foreign passports are refused, replays are ignored."""

from __future__ import annotations

import asyncio

import cbor2
import nats
import pytest
from mixer_fixtures import *  # noqa: F401,F403
from mixer_fixtures import HEARTBEAT_S, bundle_for, publish_as_rack, rack_nats_options, wait_for

from fluxrig.errors import PassportMalformed, PassportPinMismatch, PassportSignatureInvalid
from fluxrig.passport import ClusterKey, Passport, PassportStore, sign_passport, verify_passport
from fluxrig.wire import subjects as S
from fluxrig.wire.messages import CtrlMessage


async def _enrolled_active(api, agent_factory, name):
    agent = await agent_factory(name)
    await wait_for(lambda: agent.passport is not None, what=f"{name} enrolled")
    r = await api.post(f"/api/v1/racks/{name}/approve", json={})
    assert r.status_code == 200, r.text
    await wait_for(lambda: agent.status == "active" and agent.connected.is_set(), what=f"{name} active")
    return agent


async def test_rack_cannot_use_another_racks_subjects(mixer, api, agent_factory):
    a = await _enrolled_active(api, agent_factory, "rack-a")
    await _enrolled_active(api, agent_factory, "rack-b")
    errors = []

    async def on_error(exc):
        errors.append(str(exc))

    nc = await nats.connect(
        mixer.snake.url,
        **rack_nats_options(a),
        inbox_prefix="_INBOX_rack-a",
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        # Own subjects are fine.
        await nc.publish("flux.telemetry.rack-a.logs", b"x")
        await nc.subscribe("flux.ctrl.rack-a.reload")
        await nc.flush()
        await asyncio.sleep(0.2)
        assert errors == []
        # Someone else's: the server refuses every one of them.
        got = []

        async def grab(m):
            got.append(m)

        for subj in ("flux.ctrl.rack-b.>", "_INBOX_rack-b.>", "fluxrig.agent.hello", "fluxrig.agent.heartbeat.rack-b"):
            await nc.subscribe(subj, cb=grab)
        for subj in (
            "flux.telemetry.rack-b.logs",
            "flux.msg.rack-b.g.out",
            "fluxrig.agent.heartbeat.rack-b",
            "flux.ctrl.rack-b.reload",
            "$JS.API.STREAM.DELETE.flux-telemetry",
        ):
            await nc.publish(subj, b"x")
        await nc.flush()
        await wait_for(lambda: len(errors) >= 9, timeout=5, what="permission violations")
    finally:
        await nc.close()
    text = "\n".join(errors).lower()  # nats-py lower-cases the error text
    for subj in (
        "flux.ctrl.rack-b.>",
        "_INBOX_rack-b.>",
        "fluxrig.agent.hello",
        "flux.telemetry.rack-b.logs",
        "flux.msg.rack-b.g.out",
        "flux.ctrl.rack-b.reload",
        "$JS.API.STREAM.DELETE.flux-telemetry",
    ):
        assert f'"{subj.lower()}"' in text, subj
    assert got == []
    # rack-b's JetStream publish through its own identity still works, and rack-a's cannot land there.
    info = await mixer.js.stream_info("flux-telemetry")
    assert info.state.last_seq == 1  # only rack-a's own publish (the ingest may have purged it since)


async def test_enroll_user_cannot_read_hellos_or_publish(mixer):
    errors = []

    async def on_error(exc):
        errors.append(str(exc))

    nc = await nats.connect(
        mixer.snake.url,  # no credentials: the Snake's no_auth_user, the enroll identity
        tls=mixer.snake.client_tls(),
        inbox_prefix="_INBOX_ENROLL",
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        await nc.subscribe("fluxrig.agent.hello")
        await nc.publish("flux.telemetry.x.logs", b"x")
        await nc.flush()
        await wait_for(lambda: len(errors) >= 2, timeout=5, what="violations")
    finally:
        await nc.close()
    assert any('subscription to "fluxrig.agent.hello"' in e for e in errors)


async def test_pending_rack_has_no_telemetry_rights(mixer, agent_factory):
    agent = await agent_factory("pending-one")
    await wait_for(lambda: agent.connected.is_set(), what="pending rack connected")
    with pytest.raises(Exception):  # the Snake refuses the user's publish (no responders / timeout)
        await publish_as_rack(mixer.snake.url, agent, S.telemetry("pending-one", "logs"), b"\xa0", timeout=1.0)


def _passport(key, **kw):
    base = dict(
        rack_id="r1",
        rack_name="r1",
        status="active",
        bus_user="rack-r1",
        bus_password="pw",
        scenario={"meta": {"version": "1"}},
        scenario_version="1@x",
        issued_at=1000.0,
        expires_at=2e9,
        serial=1,
    )
    base.update(kw)
    return sign_passport(key, Passport(**base))


def test_tampered_passport_refused(tmp_path):
    key = ClusterKey.generate()
    data = _passport(key)
    env = cbor2.loads(data)
    body = cbor2.loads(env["payload"])
    body["scenario"] = {"meta": {"version": "evil"}, "gears": [{"name": "x", "type": "exec"}]}
    forged = cbor2.dumps({"payload": cbor2.dumps(body), "signature": env["signature"]})
    with pytest.raises(PassportSignatureInvalid):
        verify_passport(forged, [key.public_key], now=1500.0)
    # A passport signed by another key that names itself: refused by the pin.
    other = ClusterKey.generate()
    with pytest.raises(PassportPinMismatch):
        verify_passport(_passport(other), [key.public_key], now=1500.0)
    with pytest.raises(PassportMalformed):
        verify_passport(b"\x00garbage", [key.public_key])
    # Trust on first use pins the first key; a second Mixer key is then refused.
    store = PassportStore(str(tmp_path / "rack"))
    store.accept(_passport(key), now=1500.0)
    with pytest.raises(PassportPinMismatch):
        store.accept(_passport(other, serial=2), now=1500.0)
    # Two configured keys (rotation): both accepted, a third refused.
    rot = PassportStore(str(tmp_path / "rot"), configured=[key.public_key, other.public_key])
    rot.accept(_passport(key), now=1500.0)
    rot.accept(_passport(other, serial=2), now=1500.0)
    with pytest.raises(PassportPinMismatch):
        rot.accept(_passport(ClusterKey.generate(), serial=3), now=1500.0)


async def test_agent_ignores_tampered_and_replayed_passports(mixer, api, agent_factory):
    agent = await _enrolled_active(api, agent_factory, "victim")
    good = agent.passport
    raw = agent.store.raw()
    # Tampered: status flipped without a valid signature.
    env = cbor2.loads(raw)
    body = cbor2.loads(env["payload"])
    body["serial"] = body["serial"] + 10
    body["scenario"] = {"meta": {"version": "evil"}}
    forged = cbor2.dumps({"payload": cbor2.dumps(body), "signature": env["signature"]})
    await mixer.nc.publish("flux.ctrl.victim.reload", CtrlMessage(passport=forged).encode())
    # Replay of an older (but genuine) passport.
    await mixer.nc.publish("flux.ctrl.victim.passport", CtrlMessage(passport=raw).encode())
    await mixer.nc.flush()
    await asyncio.sleep(0.5)
    assert agent.passport.serial == good.serial and agent.passport.scenario_version == good.scenario_version
    assert agent.applied.calls == []
    assert agent.store.load().serial == good.serial


async def test_operator_certificates_snake(tmp_path):
    """snake.tls_cert_file from `certs init` (the operator's own files): Racks enroll over TLS
    with a bundle carrying that CA; plain text is refused."""
    from fluxrig_mixer.certs import init_certs
    from mixer_fixtures import Applied, make_mixer

    from fluxrig.agent.agent import AgentConfig, RackAgent

    certs = init_certs(str(tmp_path / "certs"))
    m = await make_mixer(
        tmp_path / "m",
        **{
            "snake.tls_cert_file": certs["cert_file"],
            "snake.tls_key_file": certs["key_file"],
            "snake.tls_ca_file": certs["ca_file"],
            "enrollment.auto_adopt": True,
        },
    )
    try:
        assert m.snake.url.startswith("tls://")
        applied = Applied().start()
        cfg = AgentConfig(
            snake_url="",
            enrollment_bundle=bundle_for(m),
            state_dir=str(tmp_path / "r"),
            name="tls-rack",
            heartbeat_interval=HEARTBEAT_S,
            reconnect_wait=0.2,
        )
        agent = RackAgent(cfg, applied.requests)
        await agent.start()
        try:
            await wait_for(lambda: agent.status == "active" and agent.connected.is_set(), what="rack over TLS")
        finally:
            await agent.stop()
            await applied.stop()
    finally:
        await m.stop()


def test_the_first_start_api_token_never_begins_with_a_dash(tmp_path, monkeypatch):
    """`--api-token -x...` is taken for an option: the Mixer never writes such a token."""
    import secrets

    from fluxrig_mixer.app import load_or_create_secret

    draws = iter(["-dash-first", "_fine"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    value, created = load_or_create_secret(str(tmp_path / "api-token"))
    assert (value, created) == ("_fine", True)
    assert (tmp_path / "api-token").stat().st_mode & 0o077 == 0
