"""Signed control commands (fluxrig/ctrl.py), sans-IO: every way a command is refused, the
bounded nonce cache and its persistence."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrig import ctrl as C
from fluxrig.passport import ClusterKey, Passport, sign_passport

KEY = ClusterKey.generate()
OTHER = ClusterKey.generate()
NOW = 1_700_000_000.0


def _signed(cmd=C.CMD_KILL, rack_id="r-1", key=KEY, now=NOW, ttl=60.0, **kw) -> bytes:
    return C.sign_command(key, C.new_command(cmd, rack_id, "edge", now=now, ttl=ttl, **kw))


def _verify(data, nonces=None, pins=(KEY.public_key,), rack_id="r-1", now=NOW + 1, verb=None):
    nonces = nonces if nonces is not None else C.NonceCache()
    return C.verify_command(data, list(pins), rack_id, nonces, verb=verb, now=now)


def test_roundtrip_every_command():
    for cmd, kw in (
        (C.CMD_KILL, {"reason": "fraud"}),
        (C.CMD_REVIVE, {}),
        (C.CMD_GEAR_STOP, {"gear": "gw"}),
        (C.CMD_CONN_CLOSE, {"conn_id": "abc", "gear": "gw"}),
    ):
        c = _verify(_signed(cmd, **kw), verb=cmd)
        assert c.cmd == cmd and c.rack_id == "r-1" and c.mixer_pub == KEY.public_key
        assert c.expires_at - c.issued_at == 60.0 and len(c.nonce) == 16
        for k, v in kw.items():
            assert getattr(c, k) == v
        assert c.summary()["nonce"] == c.nonce.hex()


def test_forged_tampered_and_unpinned_refused():
    env = cbor2.loads(_signed(reason="x"))
    body = cbor2.loads(env["payload"])
    body["cmd"] = C.CMD_REVIVE  # tampered after signing
    tampered = cbor2.dumps({"payload": cbor2.dumps(body), "signature": env["signature"]})
    with pytest.raises(C.CommandForged) as e:
        _verify(tampered)
    assert e.value.reason == "signature"
    # Forged: signed by another key that claims to be the pinned one.
    body = cbor2.loads(cbor2.loads(_signed(key=OTHER))["payload"])
    body["mixer_pub"] = KEY.public_key
    payload = cbor2.dumps(body)
    forged = cbor2.dumps({"payload": payload, "signature": OTHER.sign(C.CTRL_SIGNING_CONTEXT + payload)})
    with pytest.raises(C.CommandForged):
        _verify(forged)
    # Signed by a key the Rack does not pin (names itself honestly).
    with pytest.raises(C.CommandKeyNotPinned) as e:
        _verify(_signed(key=OTHER))
    assert e.value.presented == OTHER.public_hex
    # No pins at all: nothing is trusted on first use.
    with pytest.raises(C.CommandKeyNotPinned):
        _verify(_signed(), pins=())
    # Two pinned keys (rotation): both verify.
    _verify(_signed(key=OTHER), pins=(KEY.public_key, OTHER.public_key))


def test_passport_signature_is_not_a_command_signature():
    # Same key, same envelope shape, other context: never accepted as a command.
    data = sign_passport(
        KEY, Passport(rack_id="r-1", rack_name="edge", status="active", issued_at=NOW, expires_at=NOW + 60)
    )
    with pytest.raises(C.CommandRefused):
        _verify(data)
    body = cbor2.loads(cbor2.loads(_signed())["payload"])
    payload = cbor2.dumps(body)
    from fluxrig.passport import SIGNING_CONTEXT

    crossed = cbor2.dumps({"payload": payload, "signature": KEY.sign(SIGNING_CONTEXT + payload)})
    with pytest.raises(C.CommandForged):
        _verify(crossed)


def test_unsigned_and_malformed_refused():
    from fluxrig.wire.messages import CtrlMessage

    with pytest.raises(C.CommandUnsigned):  # a legacy, unsigned control message on a command verb
        _verify(CtrlMessage(reason="kill please").encode())
    body = cbor2.loads(cbor2.loads(_signed())["payload"])
    with pytest.raises(C.CommandUnsigned):
        _verify(cbor2.dumps({"payload": cbor2.dumps(body), "signature": b""}))
    with pytest.raises(C.CommandUnsigned):
        _verify(cbor2.dumps({"payload": cbor2.dumps(body)}))
    for garbage in (b"", b"\xff\x00", cbor2.dumps([1, 2]), b"x" * (C.MAX_COMMAND_BYTES + 1), "text"):
        with pytest.raises(C.CommandMalformed):
            _verify(garbage)
    # Missing arguments are refused before any signature is made or checked.
    with pytest.raises(C.CommandMalformed) as e:
        C.new_command(C.CMD_GEAR_STOP, "r-1")
    assert e.value.key == "args.gear"
    with pytest.raises(C.CommandMalformed):
        C.new_command(C.CMD_CONN_CLOSE, "r-1", gear="serial")  # empty conn id = "any link": never remote
    with pytest.raises(C.CommandMalformed):
        C.new_command("reboot", "r-1")


def test_wrong_rack_and_verb_refused():
    with pytest.raises(C.CommandWrongRack) as e:
        _verify(_signed(rack_id="r-2"))
    assert e.value.target == "r-2" and e.value.rack_id == "r-1"
    with pytest.raises(C.CommandWrongVerb):
        _verify(_signed(C.CMD_KILL), verb=C.CMD_REVIVE)


def test_expiry_future_and_lifetime():
    data = _signed(now=NOW, ttl=30)
    with pytest.raises(C.CommandExpired) as e:
        _verify(data, now=NOW + 31)
    assert e.value.expires_at == NOW + 30
    _verify(data, now=NOW + 29)
    with pytest.raises(C.CommandFromFuture):
        _verify(_signed(now=NOW + 1000), now=NOW)
    _verify(_signed(now=NOW + 100), now=NOW)  # within the tolerated skew
    with pytest.raises(C.CommandLifetimeTooLong):
        C.new_command(C.CMD_KILL, "r-1", ttl=C.MAX_COMMAND_TTL_S + 1)
    # A hand-made long-lived command (signed, so only the Mixer could) is still refused.
    body = cbor2.loads(cbor2.loads(_signed())["payload"])
    body["expires_at"] = NOW + 10 * C.MAX_COMMAND_TTL_S
    payload = cbor2.dumps(body)
    long_lived = cbor2.dumps({"payload": payload, "signature": KEY.sign(C.CTRL_SIGNING_CONTEXT + payload)})
    with pytest.raises(C.CommandLifetimeTooLong):
        _verify(long_lived)


def test_replay_refused_and_nonce_recorded_only_on_acceptance():
    nonces = C.NonceCache()
    data = _signed()
    _verify(data, nonces)
    with pytest.raises(C.CommandReplayed) as e:
        _verify(data, nonces, now=NOW + 2)
    assert e.value.reason == "replayed"
    # Refused commands leave no trace in the cache.
    for bad in (_signed(key=OTHER), _signed(rack_id="zz"), _signed(now=NOW - 600)):
        with pytest.raises(C.CommandRefused):
            _verify(bad, nonces)
    assert len(nonces) == 1
    assert C.peek_nonce(data) == cbor2.loads(cbor2.loads(data)["payload"])["nonce"]
    assert C.peek_nonce(b"junk") is None


def test_nonce_cache_bounded_with_floor():
    nonces = C.NonceCache(capacity=4)
    sent = [_signed(now=NOW + i) for i in range(10)]
    for i, data in enumerate(sent):
        _verify(data, nonces, now=NOW + i + 1)
    assert len(nonces) == 4 and nonces.evicted == 6 and nonces.floor == NOW + 5
    # Every command, evicted or not, is refused when replayed.
    for data in sent:
        with pytest.raises(C.CommandReplayed):
            _verify(data, nonces, now=NOW + 11)
    # Expired nonces are pruned first (no floor raise needed).
    later = C.NonceCache(capacity=2)
    _verify(_signed(now=NOW, ttl=5), later, now=NOW + 1)
    _verify(_signed(now=NOW + 1, ttl=5), later, now=NOW + 2)
    _verify(_signed(now=NOW + 20), later, now=NOW + 21)
    assert later.floor == 0.0 and later.evicted == 0 and len(later) == 1


def test_nonce_cache_state_roundtrip():
    nonces = C.NonceCache(capacity=3)
    sent = [_signed(now=NOW + i) for i in range(5)]
    for i, data in enumerate(sent):
        _verify(data, nonces, now=NOW + i + 1)
    again = C.NonceCache.from_state(nonces.to_state(), capacity=3)
    assert again.floor == nonces.floor and len(again) == len(nonces)
    for data in sent:
        with pytest.raises(C.CommandReplayed):
            _verify(data, again, now=NOW + 6)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_accepted(data):
    with pytest.raises(C.CommandRefused):
        _verify(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_single_byte_flip_refused(pos, xor):
    data = bytearray(_signed(reason="flip"))
    pos %= len(data)
    if xor == 0:
        xor = 1
    data[pos] ^= xor
    with pytest.raises(C.CommandRefused):
        _verify(bytes(data))
