"""Signed control verbs without a network (issue 12.5, 13.2): shutdown and log-level signed like
the kill switch, kill state ordered by serial, freshness judged by the Mixer's signed time
(fluxrig/timesync.py), passports ordered by serial and never refused for their age or the
Rack's clock. End to end with real Racks and a real Mixer: test_verbs_e2e.py."""

from __future__ import annotations

import logging
import time

import cbor2
import pytest

from fluxrig import ctrl as C
from fluxrig import timesync as T
from fluxrig.errors import PassportStale
from fluxrig.killswitch import VIA_HEARTBEAT, KillSwitch
from fluxrig.passport import ClusterKey, Passport, PassportStore, sign_passport, validity
from fluxrig.wire import messages as W
from fluxrig.wire.vocab import LogLevel

KEY = ClusterKey.generate()
OTHER = ClusterKey.generate()
PINS = [KEY.public_key]
NOW = 1_790_000_000.0


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    async def kill_gears(self, reason):
        self.calls.append(("kill", reason))

    async def revive_gears(self):
        self.calls.append(("revive",))

    async def stop_gear(self, name):
        self.calls.append(("stop", name))
        return True

    def close_connection(self, gear, conn_id, reason):
        self.calls.append(("close", gear, conn_id))
        return 1

    def request_shutdown(self, reason):
        self.calls.append(("shutdown", reason))

    def set_log_level(self, level):
        self.calls.append(("level", level))


def _cmd(cmd, now=NOW, key=KEY, rack_id="r-1", ttl=60.0, **kw) -> bytes:
    return C.sign_command(key, C.new_command(cmd, rack_id, "edge", now=now, ttl=ttl, **kw))


def _switch(tmp_path, judged_now=NOW + 1, window=T.SYNCED_WINDOW_S) -> KillSwitch:
    ks = KillSwitch(str(tmp_path), time_source=lambda: T.Judgement(judged_now, window, T.ClockSource.MIXER))
    ks.load()
    return ks


# -- shutdown and log-level are signed commands ----------------------------------------------------


async def test_unsigned_or_replayed_shutdown_and_log_level_are_ignored_and_counted(tmp_path, caplog):
    ks = _switch(tmp_path)
    t = Recorder()
    plain_shutdown = W.CtrlMessage(reason="go away").encode()  # the old, unsigned form
    plain_level = cbor2.dumps({"v": 1, "level": "debug"})
    for verb, data in ((C.CMD_SHUTDOWN, plain_shutdown), (C.CMD_LOG_LEVEL, plain_level)):
        out = await ks.handle(verb, data, pins=PINS, rack_id="r-1", target=t)
        assert not out["ok"] and "(unsigned)" in out["detail"]
    good = _cmd(C.CMD_SHUTDOWN, reason="maintenance")
    assert (await ks.handle(C.CMD_SHUTDOWN, good, pins=PINS, rack_id="r-1", target=t))["ok"]
    level = _cmd(C.CMD_LOG_LEVEL, level="debug")
    assert (await ks.handle(C.CMD_LOG_LEVEL, level, pins=PINS, rack_id="r-1", target=t))["ok"]
    assert t.calls == [("shutdown", "maintenance"), ("level", LogLevel.DEBUG)]
    # Replays (also after a restart: the nonces are on disk before the Rack exits).
    again = _switch(tmp_path)
    for verb, data in ((C.CMD_SHUTDOWN, good), (C.CMD_LOG_LEVEL, level)):
        out = await again.handle(verb, data, pins=PINS, rack_id="r-1", target=t)
        assert not out["ok"] and "(replayed)" in out["detail"]
    # Another Rack's, another key's, a verb mismatch: refused too.
    for verb, data in (
        (C.CMD_SHUTDOWN, _cmd(C.CMD_SHUTDOWN, rack_id="r-2")),
        (C.CMD_SHUTDOWN, _cmd(C.CMD_SHUTDOWN, key=OTHER)),
        (C.CMD_SHUTDOWN, _cmd(C.CMD_LOG_LEVEL, level="info")),
    ):
        assert not (await again.handle(verb, data, pins=PINS, rack_id="r-1", target=t))["ok"]
    assert len(t.calls) == 2
    assert again.refused_by == {"replayed": 2, "rack": 1, "pin": 1, "verb": 1}
    m = again.metrics()
    assert m["commands_refused"] == 5 and m["commands_refused_replayed"] == 2


def test_log_level_command_needs_a_level_and_only_it_takes_one():
    with pytest.raises(C.CommandMalformed, match="unknown log level"):
        C.new_command(C.CMD_LOG_LEVEL, "r-1", level="loud")
    with pytest.raises(C.CommandMalformed, match="takes no level"):
        C.new_command(C.CMD_SHUTDOWN, "r-1", level="debug")
    with pytest.raises(C.CommandMalformed, match="takes no kill-state serial"):
        C.new_command(C.CMD_SHUTDOWN, "r-1", serial=3)
    c = C.new_command(C.CMD_LOG_LEVEL, "r-1", level="WARN")
    assert c.level == "warning" and C.verify_command(C.sign_command(KEY, c), PINS, "r-1", C.NonceCache()).level == (
        "warning"
    )


async def test_refusal_logs_are_rate_limited(tmp_path, caplog):
    ks = KillSwitch(str(tmp_path), refusal_logs_per_minute=3, clock=lambda: NOW)
    ks.load()
    with caplog.at_level(logging.WARNING, "fluxrig.killswitch"):
        for _ in range(10):
            await ks.handle(C.CMD_SHUTDOWN, b"junk", pins=PINS, rack_id="r-1", target=Recorder())
    lines = [r for r in caplog.records if "command ignored" in r.getMessage()]
    assert len(lines) == 3 and ks.refused == 10


# -- kill state ordered by serial ----------------------------------------------------------------


async def test_kill_state_serial_orders_kill_and_revive(tmp_path):
    ks = _switch(tmp_path)
    t = Recorder()
    assert (await ks.handle(C.CMD_KILL, _cmd(C.CMD_KILL, serial=2), pins=PINS, rack_id="r-1", target=t))["ok"]
    assert ks.killed is not None and ks.status()["serial"] == 2
    # An older revive (overtaken on the way) is refused as stale; the Rack stays killed.
    out = await ks.handle(C.CMD_REVIVE, _cmd(C.CMD_REVIVE, serial=1), pins=PINS, rack_id="r-1", target=t)
    assert not out["ok"] and "(stale)" in out["detail"] and ks.killed is not None
    # The same state re-sent (heartbeat reply while the first was applied) is harmless.
    out = await ks.handle(VIA_HEARTBEAT, _cmd(C.CMD_KILL, serial=2), pins=PINS, rack_id="r-1", target=t)
    assert out["ok"] and "already" in out["detail"]
    # ...but the other state under the same serial is not.
    out = await ks.handle(VIA_HEARTBEAT, _cmd(C.CMD_REVIVE, serial=2), pins=PINS, rack_id="r-1", target=t)
    assert not out["ok"] and "(stale)" in out["detail"]
    # A heartbeat reply may carry only kill or revive.
    out = await ks.handle(VIA_HEARTBEAT, _cmd(C.CMD_SHUTDOWN), pins=PINS, rack_id="r-1", target=t)
    assert not out["ok"] and "(verb)" in out["detail"]
    assert (await ks.handle(C.CMD_REVIVE, _cmd(C.CMD_REVIVE, serial=5), pins=PINS, rack_id="r-1", target=t))["ok"]
    assert ks.killed is None
    again = _switch(tmp_path)  # the serial is on disk
    assert again.serial == 5 and again.killed is None
    assert not (await again.handle(C.CMD_KILL, _cmd(C.CMD_KILL, serial=4), pins=PINS, rack_id="r-1", target=t))["ok"]


# -- freshness by the Mixer's time -----------------------------------------------------------------


@pytest.mark.parametrize("local_skew", [-600.0, +600.0])
async def test_clock_ten_minutes_off_judged_by_the_mixer_time(tmp_path, local_skew):
    """The Rack's wall clock is 10 min off; its MixerClock learned the Mixer's time from one
    signed heartbeat reply: a fresh kill is accepted, a stale one refused."""
    mixer_now = [NOW]
    mono = [1000.0]
    clock = T.MixerClock(monotonic=lambda: mono[0], wall=lambda: mixer_now[0] + local_skew)
    # Without a sync the local clock decides: the fresh kill is refused (the old behaviour).
    local_only = KillSwitch(str(tmp_path / "local"), clock=lambda: mixer_now[0] + local_skew)
    local_only.load()
    out = await local_only.handle(C.CMD_KILL, _cmd(C.CMD_KILL), pins=PINS, rack_id="r-1", target=Recorder())
    assert not out["ok"] and ("(expired)" in out["detail"] or "(future)" in out["detail"])

    challenge = clock.new_challenge()
    mono[0] += 0.02  # 20 ms round trip
    assert clock.observe(T.sign_time(KEY, "r-1", challenge, now=NOW + 0.01), PINS, "r-1")
    assert abs(clock.offset() - (-local_skew)) < 0.05 and clock.judge().source is T.ClockSource.MIXER
    ks = KillSwitch(str(tmp_path / "synced"), clock=lambda: mixer_now[0] + local_skew, time_source=clock.judge)
    ks.load()
    mono[0] += 5
    stale = _cmd(C.CMD_KILL, now=NOW - 120, ttl=60)
    out = await ks.handle(C.CMD_KILL, stale, pins=PINS, rack_id="r-1", target=Recorder())
    assert not out["ok"] and "(expired)" in out["detail"]
    fresh = _cmd(C.CMD_KILL, now=NOW + 5)
    assert (await ks.handle(C.CMD_KILL, fresh, pins=PINS, rack_id="r-1", target=Recorder()))["ok"]


def test_time_stamps_are_bound_to_challenge_rack_and_key():
    mono = [50.0]
    clock = T.MixerClock(monotonic=lambda: mono[0], wall=lambda: 0.0)
    ch = clock.new_challenge()
    assert not clock.observe(T.sign_time(OTHER, "r-1", ch, now=NOW), PINS, "r-1")  # unpinned key
    assert not clock.observe(T.sign_time(KEY, "r-2", ch, now=NOW), PINS, "r-1")  # another Rack's
    assert not clock.observe(T.sign_time(KEY, "r-1", b"x" * 16, now=NOW), PINS, "r-1")  # never asked
    assert not clock.observe(b"garbage", PINS, "r-1")
    assert not clock.synced and clock.refused_by == {"pin": 1, "rack": 1, "challenge": 1, "malformed": 1}
    good = T.sign_time(KEY, "r-1", ch, now=NOW)
    assert clock.observe(good, PINS, "r-1") and clock.synced
    mono[0] += 100
    # Replayed later, to wind the clock back: the challenge was spent.
    assert not clock.observe(good, PINS, "r-1") and abs(clock.mixer_now() - (NOW + 100)) < 1e-6
    # The error bound grows with the drift since the sample.
    assert clock.error_bound() == pytest.approx(100 * T.MAX_DRIFT_PPM * 1e-6)
    assert clock.status()["source"] == "mixer"
    # A round trip too slow to measure anything is refused.
    ch = clock.new_challenge()
    mono[0] += T.MAX_SYNC_RTT_S + 1
    assert not clock.observe(T.sign_time(KEY, "r-1", ch, now=NOW + 500), PINS, "r-1")


def test_heartbeat_and_reply_carry_challenge_time_and_command():
    hb = W.Heartbeat(serial=3, challenge=b"c" * 16)
    assert W.Heartbeat.decode(hb.encode()).challenge == b"c" * 16
    assert W.Heartbeat.decode(W.Heartbeat(serial=3).encode()).challenge == b""
    with pytest.raises(W.WireError, match="challenge"):
        W.Heartbeat.decode(cbor2.dumps({"v": 1, "serial": 1, "challenge": b"x" * 100}))
    reply = W.HeartbeatReply("active", 1.0, None, time=b"t" * 100, command=b"k" * 200)
    back = W.HeartbeatReply.decode(reply.encode())
    assert back.time == b"t" * 100 and back.command == b"k" * 200
    assert W.HeartbeatReply.decode(W.HeartbeatReply("active").encode()).command == b""


# -- passports: ordered by serial, never refused for age or clock ---------------------------------


def _passport(serial=1, issued_at=NOW, ttl=30 * 86400.0, rack_id="r-1", key=KEY) -> bytes:
    return sign_passport(
        key,
        Passport(rack_id=rack_id, rack_name="edge", status="active", scenario={"meta": {"version": "1"}},
                 scenario_version=f"{serial}@x", issued_at=issued_at, expires_at=issued_at + ttl, serial=serial),
    )  # fmt: skip


def test_stored_passport_31_days_expired_or_clock_at_1970_still_loads(tmp_path):
    store = PassportStore(str(tmp_path), configured=PINS)
    store.accept(_passport(issued_at=time.time() - 61 * 86400))  # expired 31 days ago
    p = store.load()
    assert p is not None and p.serial == 1
    assert validity(p, time.time(), "local")["state"] == "expired"
    assert validity(p, None, "unknown")["state"] == "unknown"
    # The 1970 clock: the local time is "unknown", not "issued in the future".
    store2 = PassportStore(str(tmp_path / "b"), configured=PINS)
    store2.accept(_passport(issued_at=time.time()), now=86400.0)
    assert store2.load(now=86400.0).serial == 1
    assert not T.clock_plausible(86400.0) and T.clock_plausible(time.time())


def test_passports_ordered_by_serial_not_time(tmp_path):
    store = PassportStore(str(tmp_path), configured=PINS)
    store.accept(_passport(serial=5, issued_at=NOW))
    with pytest.raises(PassportStale, match="serial 4 is not newer than the stored passport's serial 5"):
        store.accept(_passport(serial=4, issued_at=NOW + 3600))  # later time stamp, older serial
    with pytest.raises(PassportStale):
        store.accept(_passport(serial=5, issued_at=NOW + 1))  # same serial, other bytes
    assert store.load().serial == 5
    store.accept(_passport(serial=6, issued_at=NOW - 3600))  # newer serial, earlier time stamp
    assert store.load().serial == 6
    store.accept(store.raw())  # the same bytes again: a retried push
    store.accept(_passport(serial=1, rack_id="r-new"))  # another Rack id (re-enrolled): not ordered
    assert store.load().rack_id == "r-new"


def test_tls_skips_certificate_dates_only_on_a_clock_that_is_unset(tmp_path):
    """A Rack at 1970 sees every certificate as "not yet valid" and could never reach the Mixer
    to learn the time; only then the dates are not checked (chain, CA and name still are)."""
    import datetime as dt
    import socket
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    # Certificates valid from tomorrow: what a Rack whose clock is behind sees.
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])

    def cert(subject, key, ca: bool):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
        b = b.serial_number(x509.random_serial_number()).not_valid_before(start)
        b = b.not_valid_after(start + dt.timedelta(days=9))
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca = cert(ca_name, ca_key, True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), leaf_key, False)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve():
        for _ in range(3):
            try:
                conn, _ = listener.accept()
                with server.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()

    def handshake(now: float, cafile) -> str:
        ctx = ssl.create_default_context(cafile=cafile)
        T.relax_tls_time_check(ctx, now=now)
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5), server_hostname="localhost"):
                return "ok"
        except ssl.SSLError as exc:
            return exc.reason or str(exc)

    try:
        assert "CERTIFICATE_VERIFY_FAILED" in handshake(time.time(), tmp_path / "ca.pem")  # a sane clock: dates count
        assert handshake(86400.0, tmp_path / "ca.pem") == "ok"  # 1970: dates skipped
        other = tmp_path / "other.pem"  # ...but never the CA
        other_key = ec.generate_private_key(ec.SECP256R1())
        other_ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(other_key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + dt.timedelta(days=9))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(other_key, hashes.SHA256())
        )  # fmt: skip
        other.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
        assert "CERTIFICATE_VERIFY_FAILED" in handshake(86400.0, other)
    finally:
        listener.close()
