"""fluxrig.wire: the vocabulary, subjects, typed messages and the signed envelope, sans-IO."""

from __future__ import annotations

import cbor2
import pytest

from fluxrig.ctrl import (
    CommandForged,
    CommandKeyNotPinned,
    CommandUnsigned,
    NonceCache,
    new_command,
    sign_command,
    verify_command,
)
from fluxrig.errors import PassportMalformed, PassportPinMismatch, PassportSignatureInvalid
from fluxrig.passport import ClusterKey, Passport, sign_passport, verify_passport
from fluxrig.wire import messages as W
from fluxrig.wire import meta as M
from fluxrig.wire import subjects as S
from fluxrig.wire.envelope import EnvelopeError, open_envelope, sign_envelope
from fluxrig.wire.vocab import ApplyState, CommandVerb, CtrlVerb, HelloStatus, LogLevel, RackStatus, TelemetryKind

# -- vocabulary ---------------------------------------------------------------------------------


def test_enums_are_their_wire_strings():
    assert RackStatus.ACTIVE == "active" and f"{ApplyState.REJECTED}" == "rejected"
    assert cbor2.loads(cbor2.dumps(TelemetryKind.LOGS)) == "logs"
    # shutdown and log-level are signed commands now (issue 12.5), no longer plain CtrlVerbs.
    assert [str(v) for v in CommandVerb] == [
        "kill",
        "revive",
        "gear-stop",
        "conn-close",
        "shutdown",
        "log-level",
        "saf",
    ]
    assert [str(v) for v in CtrlVerb] == ["reload", "passport"]


def test_log_level_parse_and_numbers():
    assert LogLevel.parse("WARN") is LogLevel.WARNING and LogLevel.parse(" Debug ") is LogLevel.DEBUG
    assert LogLevel.TRACE.number == 5 and LogLevel.ERROR.number == 40
    with pytest.raises(ValueError, match="use trace, debug, info, warning, error"):
        LogLevel.parse("loud")


# -- subjects ------------------------------------------------------------------------------------


def test_subject_builders_and_their_wildcards_agree():
    assert S.telemetry("edge-1", "logs") == "flux.telemetry.edge-1.logs"
    assert S.telemetry_of("edge-1") == "flux.telemetry.edge-1.>" and S.telemetry_all() == "flux.telemetry.>"
    assert S.msg("edge-1", "gen", "out") == "flux.msg.edge-1.gen.out" and S.msg_of("edge-1") == "flux.msg.edge-1.>"
    assert S.ctrl("edge-1", CommandVerb.KILL) == "flux.ctrl.edge-1.kill" and S.ctrl_of("edge-1") == "flux.ctrl.edge-1.>"
    assert (
        S.heartbeat("edge-1") == "fluxrig.agent.heartbeat.edge-1" and S.heartbeat_all() == "fluxrig.agent.heartbeat.*"
    )
    assert S.inbox_of("edge-1") == "_INBOX_edge-1.>"
    for subject in (S.telemetry("r", "metrics"), S.msg("r", "g", "p"), S.ctrl("r", CtrlVerb.RELOAD), S.heartbeat("r")):
        assert S.rack_of_subject(subject) == "r"
    assert S.verb_of_subject(S.ctrl("r", CommandVerb.LOG_LEVEL)) == "log-level"


@pytest.mark.parametrize("bad", ["", "Edge", "a.b", "a*", "a>", "x" * 64, None])
def test_a_rack_name_that_is_not_one_token_is_refused(bad):
    with pytest.raises(ValueError, match="invalid rack name"):
        S.msg(bad, "g", "p")


def test_unknown_telemetry_kind_is_named():
    with pytest.raises(ValueError, match="'spans' is not one of logs, metrics, traces"):
        S.telemetry("r", "spans")


# -- messages ------------------------------------------------------------------------------------

MESSAGES = [
    W.Hello("tok", "edge-1", b"k" * 32, "0.1.0", "host", {"site": "a"}),
    W.HelloReply(HelloStatus.ACTIVE, "welcome", "edge-1", 2.5, b"sealed"),
    W.Heartbeat(7, "1@abc", ApplyState.REJECTED, "ValueError: port in use", 12.5, {"gears": {"a": {"in": 1}}}),
    W.HeartbeatReply(RackStatus.ACTIVE, 30.0, b"passport"),
    W.HeartbeatReply(RackStatus.OFFLINE, 0.0, None),
    W.CtrlMessage(passport=b"p", level=LogLevel.DEBUG, reason="because"),
    W.CtrlMessage(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message):
    assert type(message).decode(message.encode()) == message


@pytest.mark.parametrize(
    ("cls", "doc", "key"),
    [
        (W.Hello, {"token": "t", "name": "n"}, "reply_key"),
        (W.Hello, {"reply_key": b"short"}, "reply_key"),
        (W.Hello, {"reply_key": b"k" * 32, "labels": ["x"]}, "labels"),
        (W.HelloReply, {"status": "maybe"}, "status"),
        (W.HelloReply, {}, "status"),
        (W.Heartbeat, {"serial": "7"}, "serial"),
        (W.Heartbeat, {"serial": True}, "serial"),
        (W.Heartbeat, {"apply": "half"}, "apply"),
        (W.HeartbeatReply, {"status": "active", "passport": "text"}, "passport"),
        (W.CtrlMessage, {"level": "loud"}, "level"),
        (W.CtrlMessage, {"v": 2}, "v"),
    ],
)
def test_a_bad_key_is_named(cls, doc, key):
    with pytest.raises(W.WireError) as err:
        cls.decode(cbor2.dumps({"v": 1, **doc}))
    assert err.value.key == key and repr(key) in str(err.value)


@pytest.mark.parametrize("data", [b"", b"\xff\xff", cbor2.dumps([1, 2]), b"x" * (W.MAX_PAYLOAD_BYTES + 1)])
def test_garbage_is_a_wire_error_not_a_crash(data):
    with pytest.raises(W.WireError):
        W.Heartbeat.decode(data)


def test_link_events_through_the_control_bus_shape():
    up = W.LinkEvent(True, "acq", "c-1")
    assert up.to_dict()["cmd"] == M.LINK_UP and W.LinkEvent.from_dict(up.to_dict()) == up
    assert W.LinkEvent.from_dict({"cmd": M.CONN_CLOSE, "args": {}}) is None
    assert W.LinkEvent.from_dict({"cmd": M.LINK_DOWN}) == W.LinkEvent(False, "")
    assert M.link_topic("acq") == "link.acq"


def test_reload_outcome_round_trip_and_bad_types():
    outcome = W.ReloadOutcome("1", "2", kept=["a"], rebuilt=["b"], ok=True, cutover_ms=0.1, duration_ms=3.0)
    doc = outcome.as_dict()
    assert doc["event"] == "reload" and W.ReloadOutcome.from_dict(doc) == outcome
    with pytest.raises(W.WireError, match="kept"):
        W.ReloadOutcome.from_dict({**doc, "kept": "a"})


def test_sealed_passport_opens_only_with_its_key():
    sk, pk = W.new_reply_keypair()
    other, _ = W.new_reply_keypair()
    box = W.seal(pk, b"secret")
    assert W.unseal(sk, box) == b"secret"
    with pytest.raises(W.WireError, match="sealed"):
        W.unseal(other, box)


# -- the signed envelope --------------------------------------------------------------------------

CONTEXT = b"fluxrig/test/v1\x00"


def _signed(key: ClusterKey, body: dict, context: bytes = CONTEXT) -> bytes:
    return sign_envelope(key.sign, context, {**body, "mixer_pub": key.public_key})


def test_envelope_verifies_against_a_pinned_key_only():
    key, other = ClusterKey.generate(), ClusterKey.generate()
    env = open_envelope(_signed(key, {"x": 1}), max_bytes=4096)
    assert env.verify([key.public_key], CONTEXT) == key.public_key and env.body["x"] == 1
    with pytest.raises(EnvelopeError) as err:
        env.verify([other.public_key], CONTEXT)
    assert err.value.reason == "pin"
    with pytest.raises(EnvelopeError) as err:
        env.verify([], CONTEXT)  # nothing pinned and no trust on first use: refused
    assert err.value.reason == "pin"
    assert env.verify([], CONTEXT, trust_named_key=True) == key.public_key


def test_envelope_signature_is_bound_to_its_context_and_bytes():
    key = ClusterKey.generate()
    data = _signed(key, {"x": 1}, b"other/context\x00")
    with pytest.raises(EnvelopeError) as err:
        open_envelope(data, max_bytes=4096).verify([key.public_key], CONTEXT)
    assert err.value.reason == "signature"
    env = cbor2.loads(_signed(key, {"x": 1}))
    env["payload"] = cbor2.dumps({**cbor2.loads(env["payload"]), "x": 2})
    with pytest.raises(EnvelopeError):
        open_envelope(cbor2.dumps(env), max_bytes=4096).verify([key.public_key], CONTEXT)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 5000,
        b"garbage",
        cbor2.dumps([1]),
        cbor2.dumps({"payload": b"x"}),
        cbor2.dumps({"payload": b"x", "signature": b"short"}),
        cbor2.dumps({"payload": "text", "signature": b"s" * 64}),
        cbor2.dumps({"payload": cbor2.dumps([1]), "signature": b"s" * 64}),
    ],  # fmt: skip
)
def test_envelope_shape_errors(data):
    with pytest.raises(EnvelopeError) as err:
        open_envelope(data, max_bytes=4096)
    assert err.value.reason in ("malformed", "unsigned")


def test_passports_and_commands_share_the_verifier_but_keep_their_errors():
    key, other = ClusterKey.generate(), ClusterKey.generate()
    passport = Passport(serial=1, rack_id="r-1", rack_name="edge", status="active", bus_user="edge",
                        bus_password="pw", issued_at=1.0, expires_at=0.0)  # fmt: skip
    data = sign_passport(key, passport)
    assert verify_passport(data, [key.public_key], check_expiry=False).rack_id == "r-1"
    with pytest.raises(PassportPinMismatch):
        verify_passport(data, [other.public_key], check_expiry=False)
    with pytest.raises(PassportMalformed):
        verify_passport(cbor2.dumps({"payload": b"x"}), [key.public_key])
    forged = cbor2.loads(data)
    forged["signature"] = bytes(64)
    with pytest.raises(PassportSignatureInvalid):
        verify_passport(cbor2.dumps(forged), [key.public_key], check_expiry=False)
    # A passport signature never passes as a command (different context), and the reverse.
    cmd = sign_command(key, new_command("kill", "r-1"))
    assert verify_command(cmd, [key.public_key], "r-1", NonceCache(), verb="kill").cmd == "kill"
    from dataclasses import replace

    from fluxrig.passport import SIGNING_CONTEXT

    command = replace(new_command("kill", "r-1"), mixer_pub=key.public_key)
    signed_as_passport = sign_envelope(key.sign, SIGNING_CONTEXT, command.to_payload())
    with pytest.raises(CommandForged):
        verify_command(signed_as_passport, [key.public_key], "r-1", NonceCache())
    with pytest.raises(CommandKeyNotPinned):
        verify_command(cmd, [other.public_key], "r-1", NonceCache())
    with pytest.raises(CommandUnsigned):
        verify_command(cbor2.dumps({"payload": b"x", "signature": b""}), [key.public_key], "r-1", NonceCache())
