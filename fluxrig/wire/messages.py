"""Rack <-> Mixer messages on the management and control planes: frozen types, CBOR, sans-IO.

Each type has `encode() -> bytes` and `decode(bytes) -> Self`; decode checks every key's type
and raises `WireError` naming the key, never returning a half-read message. Bytes are bounded
by MAX_PAYLOAD_BYTES before they are parsed. Every message carries `v` (PROTOCOL_VERSION).

    Hello           Rack -> Mixer request on `fluxrig.agent.hello` (sent as the shared enroll user):
                    {v, token, name, reply_key, version, host, labels, nkey, nkey_sig}; `reply_key`
                    is a fresh X25519 public key: the passport comes back sealed to it, because
                    every enroll client can read every enroll inbox; `nkey` is the Rack's bus
                    identity and `nkey_sig` its proof of possession (wire/identity.py).
    HelloReply      {v, status: HelloStatus, message, rack_name, heartbeat_interval, sealed}
    Heartbeat       Rack -> Mixer request on `fluxrig.agent.heartbeat.<rack>`:
                    {v, serial, scenario_version, apply: ApplyState, reason, uptime, stats,
                    challenge} (the apply report rides on the heartbeat: one channel, retried
                    for free; `challenge`: CHALLENGE_BYTES random bytes the Mixer's signed time
                    stamp must answer, fluxrig/timesync.py)
    HeartbeatReply  {v, status, heartbeat_interval, passport (bytes, only when newer than serial),
                    time (the Mixer's signed time stamp answering the challenge),
                    command (a signed kill or revive: the desired kill state, while the Rack's
                    reported kill-state serial is behind; fluxrig/ctrl.py, fluxrig/killswitch.py)}
    CtrlMessage     Mixer -> Rack on `flux.ctrl.<rack>.<CtrlVerb>` (reload, passport): {v, passport}
                    (every CommandVerb carries a signed command instead: fluxrig/ctrl.py)
    SafAnswer       Rack -> Mixer, the reply to a signed `saf` command (sent as a NATS request
                    on `flux.ctrl.<rack>.saf`; the Rack answers on its reply subject):
                    {v, ok, nonce, detail, rows, total, saga} (fluxrig/saga/ops.py)

In-Rack messages with the same discipline (they cross the runtime's control bus as dicts):

    LinkEvent       an I/O gear's link went up or down: {cmd: conn.up|conn.down, gear, conn_id, reason}
    ReloadOutcome   what a reload did (the event the Rack logs and ships as a trace)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Self

import cbor2
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from ..errors import RemoteProtocolError
from . import meta as M
from .vocab import ApplyState, HelloStatus, LogLevel, RackStatus

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD_BYTES",
    "MAX_REASON_CHARS",
    "WireError",
    "Hello",
    "HelloReply",
    "Heartbeat",
    "HeartbeatReply",
    "CtrlMessage",
    "SafAnswer",
    "MAX_SAF_ROWS",
    "LinkEvent",
    "ReloadOutcome",
    "new_reply_keypair",
    "seal",
    "unseal",
]

PROTOCOL_VERSION = 1
# Management messages are small; a passport with a big projection is the largest thing sent.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_REASON_CHARS = 2000
REPLY_KEY_BYTES = 32
# A heartbeat's time challenge (fluxrig.timesync.CHALLENGE_BYTES; at most this many accepted).
MAX_CHALLENGE_BYTES = 32
# A signed time stamp or command is small (fluxrig.ctrl.MAX_COMMAND_BYTES).
MAX_SIGNED_BYTES = 4096


class WireError(RemoteProtocolError):
    """A message is not what the protocol says; `key` names the bad key, `what` the message."""

    def __init__(self, message: str, key: str | None = None, what: str = ""):
        self.key = key
        self.what = what
        text = f"{what}: {message}" if what else message
        super().__init__(f"{text} (key {key!r})" if key else text)


def _load(data: bytes, what: str) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("must be bytes", what=what)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise WireError(f"{len(data)} bytes exceeds MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}", what=what)
    try:
        doc = cbor2.loads(bytes(data))
    except Exception as exc:  # cbor2 raises several types on garbage
        raise WireError(f"not CBOR: {exc}", what=what) from None
    if not isinstance(doc, dict):
        raise WireError("not a map", what=what)
    if doc.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {doc.get('v')!r}", "v", what)
    return doc


def _get(doc: dict, key: str, kind, default=None, *, required: bool = False, what: str = ""):
    value = doc.get(key, default)
    if value is None and not required:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        name = getattr(kind, "__name__", None) or "/".join(k.__name__ for k in kind)
        raise WireError(f"expected {name}, got {type(value).__name__}", key, what)
    return value


def _enum(doc: dict, key: str, enum, default, what: str):
    text = _get(doc, key, str, default, required=default is None, what=what)
    try:
        return enum(text)
    except ValueError:
        raise WireError(f"unknown {key} {text!r} (one of {', '.join(enum)})", key, what) from None


def _dump(body: dict) -> bytes:
    return cbor2.dumps({"v": PROTOCOL_VERSION, **body})


@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    name: str
    reply_key: bytes
    version: str = ""
    host: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # The Rack's bus identity (wire/identity.py): its NKey public key and a proof that it holds
    # the seed (a signature over reply_key). Labels here are a request: the Mixer takes labels
    # from the enrollment token or the operator, never from the Hello alone.
    nkey: str = ""
    nkey_sig: bytes = b""

    def encode(self) -> bytes:
        return _dump({"token": self.token, "name": self.name, "reply_key": self.reply_key, "version": self.version,
                      "host": self.host, "labels": dict(self.labels), "nkey": self.nkey,
                      "nkey_sig": self.nkey_sig})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Self:
        w = "hello"
        doc = _load(data, w)
        reply_key = _get(doc, "reply_key", bytes, required=True, what=w)
        if len(reply_key) != REPLY_KEY_BYTES:
            raise WireError(f"must be a {REPLY_KEY_BYTES}-byte X25519 public key", "reply_key", w)
        labels = _get(doc, "labels", dict, {}, what=w)
        return cls(
            token=_get(doc, "token", str, "", what=w),
            name=_get(doc, "name", str, "", what=w),
            reply_key=reply_key,
            version=_get(doc, "version", str, "", what=w),
            host=_get(doc, "host", str, "", what=w),
            labels={str(k): str(v) for k, v in labels.items()},
            nkey=_get(doc, "nkey", str, "", what=w),
            nkey_sig=_get(doc, "nkey_sig", bytes, b"", what=w),
        )


@dataclass(frozen=True, slots=True)
class HelloReply:
    status: HelloStatus
    message: str = ""
    rack_name: str = ""
    heartbeat_interval: float = 0.0
    sealed: bytes = b""

    def encode(self) -> bytes:
        return _dump({"status": str(self.status), "message": self.message, "rack_name": self.rack_name,
                      "heartbeat_interval": float(self.heartbeat_interval), "sealed": self.sealed})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Self:
        w = "hello reply"
        doc = _load(data, w)
        return cls(
            status=_enum(doc, "status", HelloStatus, None, w),
            message=_get(doc, "message", str, "", what=w),
            rack_name=_get(doc, "rack_name", str, "", what=w),
            heartbeat_interval=float(_get(doc, "heartbeat_interval", (int, float), 0.0, what=w)),
            sealed=_get(doc, "sealed", bytes, b"", what=w),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    serial: int
    scenario_version: str = ""
    apply: ApplyState = ApplyState.NONE
    reason: str = ""
    uptime: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    challenge: bytes = b""
    # storage (issue 13): names of the Rack's WALs that are failed right now ("lanes",
    # "telemetry"), i.e. refusing appends until the disk has room again; empty when healthy.
    storage_failed: tuple[str, ...] = ()

    def encode(self) -> bytes:
        body = {"serial": int(self.serial), "scenario_version": self.scenario_version, "apply": str(self.apply),
                "reason": self.reason[:MAX_REASON_CHARS], "uptime": float(self.uptime),
                "stats": dict(self.stats)}  # fmt: skip
        if self.challenge:
            body["challenge"] = bytes(self.challenge)
        if self.storage_failed:
            body["storage_failed"] = [str(n) for n in self.storage_failed]
        return _dump(body)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        w = "heartbeat"
        doc = _load(data, w)
        return cls(
            serial=_get(doc, "serial", int, 0, what=w),
            scenario_version=_get(doc, "scenario_version", str, "", what=w),
            apply=_enum(doc, "apply", ApplyState, "none", w),
            reason=_get(doc, "reason", str, "", what=w)[:MAX_REASON_CHARS],
            uptime=float(_get(doc, "uptime", (int, float), 0.0, what=w)),
            stats=_get(doc, "stats", dict, {}, what=w),
            challenge=_bounded(doc, "challenge", MAX_CHALLENGE_BYTES, w),
            storage_failed=tuple(str(n)[:64] for n in _get(doc, "storage_failed", list, [], what=w)[:8]),
        )


def _bounded(doc: dict, key: str, limit: int, what: str) -> bytes:
    value = _get(doc, key, bytes, b"", what=what)
    if len(value) > limit:
        raise WireError(f"{len(value)} bytes exceeds {limit}", key, what)
    return value


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    status: RackStatus | str
    heartbeat_interval: float = 0.0
    passport: bytes | None = None
    time: bytes = b""  # the Mixer's signed time stamp (fluxrig.timesync.sign_time)
    command: bytes = b""  # a signed kill/revive: the desired kill state (fluxrig.ctrl)

    def encode(self) -> bytes:
        body = {"status": str(self.status), "heartbeat_interval": float(self.heartbeat_interval),
                "passport": self.passport}  # fmt: skip
        if self.time:
            body["time"] = bytes(self.time)
        if self.command:
            body["command"] = bytes(self.command)
        return _dump(body)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        w = "heartbeat reply"
        doc = _load(data, w)
        status = _get(doc, "status", str, required=True, what=w)
        try:  # a status this build does not know is passed on as text (a newer Mixer)
            status = RackStatus(status)
        except ValueError:
            pass
        return cls(
            status=status,
            heartbeat_interval=float(_get(doc, "heartbeat_interval", (int, float), 0.0, what=w)),
            passport=_get(doc, "passport", bytes, None, what=w),
            time=_bounded(doc, "time", MAX_SIGNED_BYTES, w),
            command=_bounded(doc, "command", MAX_SIGNED_BYTES, w),
        )


@dataclass(frozen=True, slots=True)
class CtrlMessage:
    """A plain control message; a passport inside is verified by the Rack, the rest is advice."""

    passport: bytes | None = None
    level: LogLevel | None = None
    reason: str = ""

    def encode(self) -> bytes:
        return _dump({"passport": self.passport, "level": str(self.level) if self.level else None,
                      "reason": self.reason[:MAX_REASON_CHARS]})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Self:
        w = "control message"
        doc = _load(data, w)
        level = _get(doc, "level", str, None, what=w)
        if level is not None:
            try:
                level = LogLevel.parse(level)
            except ValueError as exc:
                raise WireError(str(exc), "level", w) from None
        return cls(
            passport=_get(doc, "passport", bytes, None, what=w),
            level=level,
            reason=_get(doc, "reason", str, "", what=w)[:MAX_REASON_CHARS],
        )


# A `saf list` answer carries at most this many rows (fluxrig.saga.ops.MAX_ROWS is below it).
MAX_SAF_ROWS = 1000


def _plain(value, depth: int = 0):
    """A decoded CBOR value kept only if it is JSON-like (str keys, bounded nesting)."""
    if depth > 6:
        return None
    if isinstance(value, dict):
        return {str(k)[:64]: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


@dataclass(frozen=True, slots=True)
class SafAnswer:
    """What a Rack answers to a `saf` command: the kill switch's verdict on the command
    (`ok` False with `detail` "refused (...)" when it did not verify) and the operator view."""

    ok: bool
    nonce: str = ""
    detail: str = ""
    rows: list = field(default_factory=list)
    total: int = 0
    saga: dict | None = None

    @classmethod
    def from_outcome(cls, outcome: dict | None) -> Self:
        """From the kill switch's outcome dict (`result` holds fluxrig.saga.ops.answer's dict)."""
        outcome = outcome or {}
        result = outcome.get("result") if isinstance(outcome.get("result"), dict) else {}
        ok = bool(outcome.get("ok")) and bool(result.get("ok", False))
        detail = str(result.get("detail") or outcome.get("detail") or "no outcome from the Rack")
        return cls(ok, str(outcome.get("nonce") or ""), detail, list(result.get("rows") or [])[:MAX_SAF_ROWS],
                   int(result.get("total") or 0), result.get("saga"))  # fmt: skip

    def encode(self) -> bytes:
        return _dump({"ok": bool(self.ok), "nonce": self.nonce, "detail": self.detail[:MAX_REASON_CHARS],
                      "rows": list(self.rows)[:MAX_SAF_ROWS], "total": int(self.total), "saga": self.saga})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Self:
        w = "saf answer"
        doc = _load(data, w)
        rows = _get(doc, "rows", list, [], what=w)
        if len(rows) > MAX_SAF_ROWS:
            raise WireError(f"{len(rows)} rows exceeds MAX_SAF_ROWS={MAX_SAF_ROWS}", "rows", w)
        return cls(
            ok=_get(doc, "ok", bool, False, what=w),
            nonce=_get(doc, "nonce", str, "", what=w)[:64],
            detail=_get(doc, "detail", str, "", what=w)[:MAX_REASON_CHARS],
            rows=[_plain(r) for r in rows if isinstance(r, dict)],
            total=_get(doc, "total", int, 0, what=w),
            saga=_plain(_get(doc, "saga", dict, None, what=w)),
        )

    def to_dict(self) -> dict:
        return {"ok": self.ok, "nonce": self.nonce, "detail": self.detail, "rows": self.rows, "total": self.total,
                "saga": self.saga}  # fmt: skip


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """An I/O gear's link went up or down (the in-Rack control bus carries it as a dict)."""

    up: bool
    gear: str
    conn_id: str = ""
    reason: str = ""

    def to_dict(self) -> dict:
        return {"cmd": M.LINK_UP if self.up else M.LINK_DOWN,
                "args": {"gear": self.gear, "conn_id": self.conn_id, "reason": self.reason}}  # fmt: skip

    @classmethod
    def from_dict(cls, cmd: dict) -> Self | None:
        """The event in a control-bus command, or None when `cmd` is not a link event."""
        kind = cmd.get("cmd") if isinstance(cmd, dict) else None
        if kind not in (M.LINK_UP, M.LINK_DOWN):
            return None
        args = cmd.get("args") if isinstance(cmd.get("args"), dict) else {}
        return cls(kind == M.LINK_UP, str(args.get("gear") or ""), str(args.get("conn_id") or ""),
                   str(args.get("reason") or ""))  # fmt: skip


@dataclass(slots=True)
class ReloadOutcome:
    """What a reload did: versions, gears kept/rebuilt/added/removed, whether it took, timings."""

    old_version: str
    new_version: str
    kept: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    ok: bool = False
    reason: str = ""
    cutover_ms: float = 0.0
    duration_ms: float = 0.0
    # per rebuilt gear, what happened to its live connections (issue 18), e.g.
    # {"gw": {"connections": "handover", "count": 16}} or {..., "connections": "reset", "reason": ...}
    handover: dict[str, dict] = field(default_factory=dict)

    EVENT = "reload"

    def as_dict(self) -> dict:
        return {"event": self.EVENT, **asdict(self)}

    @classmethod
    def from_dict(cls, doc: dict) -> Self:
        """From `as_dict()` output (keys it does not know are ignored); WireError on bad types."""
        w = "reload outcome"
        names = ("kept", "rebuilt", "added", "removed")
        lists = {n: [str(x) for x in _get(doc, n, list, [], what=w)] for n in names}
        return cls(
            old_version=_get(doc, "old_version", str, "", what=w),
            new_version=_get(doc, "new_version", str, "", what=w),
            ok=bool(doc.get("ok")),
            reason=_get(doc, "reason", str, "", what=w)[:MAX_REASON_CHARS],
            cutover_ms=float(_get(doc, "cutover_ms", (int, float), 0.0, what=w)),
            duration_ms=float(_get(doc, "duration_ms", (int, float), 0.0, what=w)),
            handover={
                str(g)[:MAX_REASON_CHARS]: {
                    str(k)[:64]: v if isinstance(v, int) else str(v)[:MAX_REASON_CHARS] for k, v in h.items()
                }  # fmt: skip
                for g, h in _get(doc, "handover", dict, {}, what=w).items()
                if isinstance(h, dict)
            },
            **lists,
        )


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
        raise WireError("sealed passport does not open with this Hello's key", "sealed", "hello reply") from None
