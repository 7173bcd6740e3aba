"""Agent <-> Mixer payloads on the management plane: CBOR maps, sans-IO.

Each `encode_*` returns bytes; each `decode_*` takes bytes and returns a plain dict with every
key present and typed, or raises AgentProtocolError naming the key. No I/O, no asyncio.

Hello (Rack -> Mixer, request on `fluxrig.agent.hello`, sent as the shared `enroll` bus user):
    {v, token, name, reply_key, version, host, labels}
    `reply_key` is a fresh X25519 public key: the Mixer seals the passport (which carries the
    Rack's bus password) to it, because every enroll client can read every enroll inbox.
HelloReply: {v, status: pending|active|denied, message, rack_name, heartbeat_interval, sealed}
Heartbeat (Rack -> Mixer, request on `fluxrig.agent.heartbeat.<rack>`):
    {v, serial, scenario_version, apply: none|applied|rejected|applying, reason, uptime, stats}
    The apply report rides on the heartbeat: one channel, retried for free.
HeartbeatReply: {v, status, heartbeat_interval, passport (bytes, only when newer than serial)}
Ctrl (Mixer -> Rack on `flux.ctrl.<rack>.<verb>`): {v, passport?, level?, reason?}
"""

from __future__ import annotations

import cbor2
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from ..errors import RemoteProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD_BYTES",
    "APPLY_STATES",
    "AgentProtocolError",
    "encode_hello",
    "decode_hello",
    "encode_hello_reply",
    "decode_hello_reply",
    "encode_heartbeat",
    "decode_heartbeat",
    "encode_heartbeat_reply",
    "decode_heartbeat_reply",
    "encode_ctrl",
    "decode_ctrl",
    "new_reply_keypair",
    "seal",
    "unseal",
]

PROTOCOL_VERSION = 1
# Management messages are small; a passport with a big projection is the largest thing sent.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
APPLY_STATES = ("none", "applying", "applied", "rejected")
HELLO_STATUSES = ("pending", "active", "denied")


class AgentProtocolError(RemoteProtocolError):
    """A management payload is not what the protocol says; `key` names the bad key."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key else message)


def _load(data: bytes, what: str) -> dict:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise AgentProtocolError(f"{what} of {len(data)} bytes exceeds MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}")
    try:
        doc = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise AgentProtocolError(f"{what} is not CBOR: {exc}") from None
    if not isinstance(doc, dict):
        raise AgentProtocolError(f"{what} is not a map")
    if doc.get("v") != PROTOCOL_VERSION:
        raise AgentProtocolError(f"{what}: unsupported protocol version {doc.get('v')!r}", "v")
    return doc


def _get(doc: dict, key: str, kind, default=None, required: bool = False):
    value = doc.get(key, default)
    if value is None and not required:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise AgentProtocolError(f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}", key)
    return value


def encode_hello(token: str, name: str, reply_key: bytes, version: str = "", host: str = "", labels=None) -> bytes:
    return cbor2.dumps(
        {
            "v": PROTOCOL_VERSION,
            "token": token,
            "name": name,
            "reply_key": reply_key,
            "version": version,
            "host": host,
            "labels": dict(labels or {}),
        }
    )


def decode_hello(data: bytes) -> dict:
    doc = _load(data, "hello")
    reply_key = _get(doc, "reply_key", bytes, required=True)
    if len(reply_key) != 32:
        raise AgentProtocolError("must be a 32-byte X25519 public key", "reply_key")
    labels = _get(doc, "labels", dict, {})
    return {
        "token": _get(doc, "token", str, ""),
        "name": _get(doc, "name", str, ""),
        "reply_key": reply_key,
        "version": _get(doc, "version", str, ""),
        "host": _get(doc, "host", str, ""),
        "labels": {str(k): str(v) for k, v in labels.items()},
    }


def encode_hello_reply(
    status: str, message: str = "", rack_name: str = "", heartbeat_interval: float = 0.0, sealed: bytes = b""
) -> bytes:
    return cbor2.dumps(
        {
            "v": PROTOCOL_VERSION,
            "status": status,
            "message": message,
            "rack_name": rack_name,
            "heartbeat_interval": float(heartbeat_interval),
            "sealed": sealed,
        }
    )


def decode_hello_reply(data: bytes) -> dict:
    doc = _load(data, "hello reply")
    status = _get(doc, "status", str, required=True)
    if status not in HELLO_STATUSES:
        raise AgentProtocolError(f"unknown status {status!r}", "status")
    return {
        "status": status,
        "message": _get(doc, "message", str, ""),
        "rack_name": _get(doc, "rack_name", str, ""),
        "heartbeat_interval": float(_get(doc, "heartbeat_interval", (int, float), 0.0)),
        "sealed": _get(doc, "sealed", bytes, b""),
    }


def encode_heartbeat(
    serial: int, scenario_version: str = "", apply: str = "none", reason: str = "", uptime: float = 0.0, stats=None
) -> bytes:
    return cbor2.dumps(
        {
            "v": PROTOCOL_VERSION,
            "serial": int(serial),
            "scenario_version": scenario_version,
            "apply": apply,
            "reason": reason,
            "uptime": float(uptime),
            "stats": dict(stats or {}),
        }
    )


def decode_heartbeat(data: bytes) -> dict:
    doc = _load(data, "heartbeat")
    apply = _get(doc, "apply", str, "none")
    if apply not in APPLY_STATES:
        raise AgentProtocolError(f"unknown apply state {apply!r}", "apply")
    return {
        "serial": _get(doc, "serial", int, 0),
        "scenario_version": _get(doc, "scenario_version", str, ""),
        "apply": apply,
        "reason": _get(doc, "reason", str, "")[:2000],
        "uptime": float(_get(doc, "uptime", (int, float), 0.0)),
        "stats": _get(doc, "stats", dict, {}),
    }


def encode_heartbeat_reply(status: str, heartbeat_interval: float, passport: bytes | None = None) -> bytes:
    return cbor2.dumps(
        {"v": PROTOCOL_VERSION, "status": status, "heartbeat_interval": float(heartbeat_interval), "passport": passport}
    )


def decode_heartbeat_reply(data: bytes) -> dict:
    doc = _load(data, "heartbeat reply")
    return {
        "status": _get(doc, "status", str, required=True),
        "heartbeat_interval": float(_get(doc, "heartbeat_interval", (int, float), 0.0)),
        "passport": _get(doc, "passport", bytes, None),
    }


def encode_ctrl(passport: bytes | None = None, level: str | None = None, reason: str = "") -> bytes:
    return cbor2.dumps({"v": PROTOCOL_VERSION, "passport": passport, "level": level, "reason": reason})


def decode_ctrl(data: bytes) -> dict:
    doc = _load(data, "control message")
    return {
        "passport": _get(doc, "passport", bytes, None),
        "level": _get(doc, "level", str, None),
        "reason": _get(doc, "reason", str, ""),
    }


def new_reply_keypair() -> tuple[PrivateKey, bytes]:
    """A one-use X25519 key pair for a Hello: (private key, 32-byte public key)."""
    sk = PrivateKey.generate()
    return sk, bytes(sk.public_key)


def seal(reply_key: bytes, data: bytes) -> bytes:
    return SealedBox(PublicKey(reply_key)).encrypt(data)


def unseal(private_key: PrivateKey, data: bytes) -> bytes:
    try:
        return SealedBox(private_key).decrypt(data)
    except CryptoError:
        raise AgentProtocolError("sealed passport does not open with this Hello's key", "sealed") from None
