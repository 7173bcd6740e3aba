"""Signed control commands (the kill switch): format, signing and verification, sans-IO.

The Mixer sends a command on `flux.ctrl.<rack>.<verb>`; the Rack acts on it only when it
verifies. Bus permissions already keep other Racks off that subject, but a Rack must not
have to trust the bus: a command is signed by the Mixer's Ed25519 cluster key (the key that
signs passports, fluxrig.passport.ClusterKey) and checked against the Rack's pinned key(s).

Format. A CBOR map `{"payload": bytes, "signature": bytes}` (the passport's envelope shape).
`payload` is CBOR, so the signed bytes are exactly the bytes sent, never re-encoded:

    v           CTRL_FORMAT
    cmd         one of COMMANDS, and equal to the subject's <verb>
    rack_id     the target Rack's id: a command for another Rack never verifies here
    rack        the target's name when signed (informational: names change on rename)
    args        {"gear": str, "conn_id": str, "reason": str}
    nonce       NONCE_BYTES random bytes: a command is accepted at most once
    issued_at, expires_at    unix seconds; lifetime at most MAX_COMMAND_TTL_S
    mixer_pub   the 32-byte key that signed

`signature` is Ed25519 over CTRL_SIGNING_CONTEXT + payload. The context differs from the
passport's, so a passport signature can never pass as a command signature or the reverse.

Verification (`verify_command`) refuses, with a CommandRefused subclass whose `reason` is a
short word: too big or not an envelope (`malformed`), no signature (`unsigned`), a key that
is not pinned (`pin`; never trust-on-first-use for commands), a signature that does not verify
(`signature`), another Rack's command (`rack`), a verb that is not the payload's (`verb`),
`expired`, issued too far in the future (`future`), a lifetime above the cap (`lifetime`), or a
nonce already seen (`replayed`). The nonce is recorded only once every other check passed, so
garbage cannot fill the cache.

Replay protection is bounded: `NonceCache` keeps each accepted nonce until its command
expires, at most `capacity` of them. When full of live nonces it evicts the oldest and raises
its `floor` to that command's issue time; a command issued at or before the floor is refused
as possibly replayed. Memory stays bounded and an evicted nonce can never be accepted again.
The cache serialises to a dict (`to_state`/`from_state`) so the Rack can keep it across
restarts (fluxrig/killswitch.py).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import cbor2
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from .agent import subjects as S
from .errors import FluxError
from .passport import CLOCK_SKEW_S, ClusterKey

__all__ = [
    "CTRL_FORMAT",
    "CTRL_SIGNING_CONTEXT",
    "COMMANDS",
    "CMD_KILL",
    "CMD_REVIVE",
    "CMD_GEAR_STOP",
    "CMD_CONN_CLOSE",
    "MAX_COMMAND_BYTES",
    "MAX_REASON_CHARS",
    "DEFAULT_COMMAND_TTL_S",
    "MAX_COMMAND_TTL_S",
    "DEFAULT_NONCE_CAPACITY",
    "Command",
    "NonceCache",
    "CommandRefused",
    "CommandMalformed",
    "CommandUnsigned",
    "CommandKeyNotPinned",
    "CommandForged",
    "CommandWrongRack",
    "CommandWrongVerb",
    "CommandExpired",
    "CommandFromFuture",
    "CommandLifetimeTooLong",
    "CommandReplayed",
    "new_command",
    "sign_command",
    "verify_command",
    "peek_nonce",
]

CTRL_FORMAT = 1
CTRL_SIGNING_CONTEXT = b"fluxrig/ctrl/v1\x00"
# The command names are the subject verbs (one list, in fluxrig/agent/subjects.py).
CMD_KILL, CMD_REVIVE, CMD_GEAR_STOP, CMD_CONN_CLOSE = S.CTRL_COMMANDS
COMMANDS = S.CTRL_COMMANDS
# A command is a few hundred bytes; anything much larger is not one (and is not decoded).
MAX_COMMAND_BYTES = 4096
MAX_REASON_CHARS = 500
MAX_NAME_CHARS = 200
NONCE_BYTES = 16
DEFAULT_COMMAND_TTL_S = 60.0
# The nonce cache holds each nonce for the command's lifetime, so the lifetime is capped.
MAX_COMMAND_TTL_S = 600.0
DEFAULT_NONCE_CAPACITY = 4096


# -- errors (typed, structured: `reason` word, `key` for malformed payload keys) ----------------


class CommandRefused(FluxError):
    """A control command was not accepted; `reason` is a short machine-readable word."""

    reason = "refused"

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key else message)


class CommandMalformed(CommandRefused):
    """Not a command envelope, too big, or a payload key of the wrong type (`key`)."""

    reason = "malformed"


class CommandUnsigned(CommandRefused):
    """No signature at all (e.g. a plain control message on a command verb)."""

    reason = "unsigned"


class CommandKeyNotPinned(CommandRefused):
    """Signed by a key the Rack does not pin; `presented` and `pinned` are hex keys."""

    reason = "pin"

    def __init__(self, presented: str, pinned: list[str]):
        self.presented = presented
        self.pinned = list(pinned)
        super().__init__(f"signed by key {presented[:16]}..., which is not pinned "
                         f"(pinned: {', '.join(p[:16] + '...' for p in pinned) or 'none'})")


class CommandForged(CommandRefused):
    """The signature does not verify against the key the command names (forged or tampered)."""

    reason = "signature"


class CommandWrongRack(CommandRefused):
    """Addressed to another Rack (`target` id) than this one (`rack_id`)."""

    reason = "rack"

    def __init__(self, target: str, rack_id: str):
        self.target = target
        self.rack_id = rack_id
        super().__init__(f"addressed to rack {target!r}, this is {rack_id!r}")


class CommandWrongVerb(CommandRefused):
    """The subject's verb and the signed `cmd` differ."""

    reason = "verb"


class CommandExpired(CommandRefused):
    """`expires_at` (unix s) is before `now`."""

    reason = "expired"

    def __init__(self, expires_at: float, now: float):
        self.expires_at = expires_at
        self.now = now
        super().__init__(f"expired {now - expires_at:.1f}s ago")


class CommandFromFuture(CommandRefused):
    """Issued more than the tolerated clock skew (`limit` s) after `now`."""

    reason = "future"

    def __init__(self, issued_at: float, now: float, limit: float):
        self.issued_at = issued_at
        self.now = now
        self.limit = limit
        super().__init__(f"issued {issued_at - now:.0f}s in the future (clock skew limit {limit:.0f}s)")


class CommandLifetimeTooLong(CommandRefused):
    """`expires_at - issued_at` exceeds `limit` seconds."""

    reason = "lifetime"

    def __init__(self, lifetime: float, limit: float):
        self.lifetime = lifetime
        self.limit = limit
        super().__init__(f"lifetime {lifetime:.0f}s exceeds MAX_COMMAND_TTL_S={limit:.0f}s")


class CommandReplayed(CommandRefused):
    """The nonce was accepted before, or the command predates the replay window (`floor`)."""

    reason = "replayed"

    def __init__(self, nonce: bytes, why: str):
        self.nonce = nonce
        super().__init__(f"nonce {nonce.hex()[:16]}... {why}")


# -- the command ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    cmd: str
    rack_id: str
    rack: str = ""
    gear: str = ""
    conn_id: str = ""
    reason: str = ""
    nonce: bytes = b""
    issued_at: float = 0.0
    expires_at: float = 0.0
    mixer_pub: bytes = b""

    def to_payload(self) -> dict:
        return {
            "v": CTRL_FORMAT,
            "cmd": self.cmd,
            "rack_id": self.rack_id,
            "rack": self.rack,
            "args": {"gear": self.gear, "conn_id": self.conn_id, "reason": self.reason},
            "nonce": self.nonce,
            "issued_at": float(self.issued_at),
            "expires_at": float(self.expires_at),
            "mixer_pub": self.mixer_pub,
        }

    def summary(self) -> dict:
        """A JSON-friendly view (for logs, heartbeats and API answers)."""
        out = {"cmd": self.cmd, "rack": self.rack, "nonce": self.nonce.hex(), "reason": self.reason,
               "issued_at": self.issued_at, "expires_at": self.expires_at}
        if self.gear:
            out["gear"] = self.gear
        if self.conn_id:
            out["conn_id"] = self.conn_id
        return out


def _check_args(cmd: str, gear: str, conn_id: str) -> None:
    if cmd not in COMMANDS:
        raise CommandMalformed(f"unknown command {cmd!r}; one of {', '.join(COMMANDS)}", "cmd")
    if cmd == CMD_GEAR_STOP and not gear:
        raise CommandMalformed("gear-stop names no gear", "args.gear")
    if cmd == CMD_CONN_CLOSE and not conn_id:
        # An empty id means "any link" to a serial gear: never let a remote command say that.
        raise CommandMalformed("conn-close names no connection", "args.conn_id")


def new_command(cmd: str, rack_id: str, rack: str = "", *, gear: str = "", conn_id: str = "", reason: str = "",
                ttl: float = DEFAULT_COMMAND_TTL_S, now: float | None = None) -> Command:
    """A fresh, unsigned command with a random nonce, valid for `ttl` seconds from `now`."""
    _check_args(cmd, gear, conn_id)
    if not 0 < ttl <= MAX_COMMAND_TTL_S:
        raise CommandLifetimeTooLong(ttl, MAX_COMMAND_TTL_S)
    now = time.time() if now is None else now
    return Command(cmd, rack_id, rack, gear, conn_id, reason[:MAX_REASON_CHARS], os.urandom(NONCE_BYTES),
                   now, now + ttl)


def sign_command(key: ClusterKey, command: Command) -> bytes:
    """Envelope bytes for `command`, signed by `key` (which also becomes `mixer_pub`)."""
    payload = cbor2.dumps(replace(command, mixer_pub=key.public_key).to_payload())
    return cbor2.dumps({"payload": payload, "signature": key.sign(CTRL_SIGNING_CONTEXT + payload)})


# -- verification --------------------------------------------------------------------------------


def _open(data) -> tuple[bytes, bytes, dict]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CommandMalformed("a command must be bytes")
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandMalformed(f"{len(data)} bytes exceeds MAX_COMMAND_BYTES={MAX_COMMAND_BYTES}")
    try:
        env = cbor2.loads(bytes(data))
    except Exception as exc:  # cbor2 raises several types for garbage
        raise CommandMalformed(f"not CBOR: {exc}") from None
    if not isinstance(env, dict):
        raise CommandMalformed("not an envelope {payload, signature}")
    if not env.get("signature"):
        raise CommandUnsigned("no signature: commands must be signed by the Mixer")
    payload, signature = env.get("payload"), env["signature"]
    if set(env) != {"payload", "signature"} or not isinstance(payload, bytes) or not isinstance(signature, bytes) \
            or len(signature) != 64:
        raise CommandMalformed("not an envelope {payload: bytes, signature: 64 bytes}")
    try:
        body = cbor2.loads(payload)
    except Exception as exc:
        raise CommandMalformed(f"payload is not CBOR: {exc}") from None
    if not isinstance(body, dict):
        raise CommandMalformed("payload is not a map")
    return payload, signature, body


def _field(doc: dict, key: str, kind, limit: int | None = None):
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CommandMalformed(f"missing or not {getattr(kind, '__name__', kind)}", key)
    if limit is not None and len(value) > limit:
        raise CommandMalformed(f"longer than {limit}", key)
    return value


def _parse(body: dict) -> Command:
    if body.get("v") != CTRL_FORMAT:
        raise CommandMalformed(f"unsupported command format {body.get('v')!r}", "v")
    args = body.get("args")
    if not isinstance(args, dict):
        raise CommandMalformed("not a map", "args")
    nonce = _field(body, "nonce", bytes)
    if len(nonce) != NONCE_BYTES:
        raise CommandMalformed(f"must be {NONCE_BYTES} bytes", "nonce")
    mixer_pub = _field(body, "mixer_pub", bytes)
    if len(mixer_pub) != 32:
        raise CommandMalformed("must be 32 bytes", "mixer_pub")
    gear = _field(args, "gear", str, MAX_NAME_CHARS) if args.get("gear") is not None else ""
    conn_id = _field(args, "conn_id", str, MAX_NAME_CHARS) if args.get("conn_id") is not None else ""
    reason = _field(args, "reason", str, MAX_REASON_CHARS) if args.get("reason") is not None else ""
    cmd = _field(body, "cmd", str, MAX_NAME_CHARS)
    _check_args(cmd, gear, conn_id)
    return Command(
        cmd=cmd,
        rack_id=_field(body, "rack_id", str, MAX_NAME_CHARS),
        rack=str(body.get("rack") or "")[:MAX_NAME_CHARS],
        gear=gear,
        conn_id=conn_id,
        reason=reason,
        nonce=nonce,
        issued_at=float(_field(body, "issued_at", (int, float))),
        expires_at=float(_field(body, "expires_at", (int, float))),
        mixer_pub=mixer_pub,
    )


def peek_nonce(data) -> bytes | None:
    """The nonce a command claims, WITHOUT verifying anything (to report a refusal only)."""
    try:
        body = cbor2.loads(cbor2.loads(bytes(data)[:MAX_COMMAND_BYTES])["payload"])
        nonce = body.get("nonce")
        return nonce if isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES else None
    except Exception:
        return None


def verify_command(
    data,
    pinned: list[bytes] | tuple[bytes, ...],
    rack_id: str,
    nonces: "NonceCache",
    *,
    verb: str | None = None,
    now: float | None = None,
    skew: float = CLOCK_SKEW_S,
    max_ttl: float = MAX_COMMAND_TTL_S,
) -> Command:
    """Verify `data` for the Rack `rack_id` and record its nonce; return the Command.

    `pinned` are the Rack's pinned Mixer keys (an empty list refuses everything: commands
    are never trusted on first use). `verb` is the subject's last token. Raises a
    CommandRefused subclass (see the module docstring); the nonce cache is changed only
    when the command is accepted.
    """
    payload, signature, body = _open(data)
    command = _parse(body)
    if command.mixer_pub not in pinned:
        raise CommandKeyNotPinned(command.mixer_pub.hex(), [k.hex() for k in pinned])
    try:
        VerifyKey(command.mixer_pub).verify(CTRL_SIGNING_CONTEXT + payload, signature)
    except BadSignatureError:
        raise CommandForged("signature does not verify (forged or tampered)") from None
    if command.rack_id != rack_id:
        raise CommandWrongRack(command.rack_id, rack_id)
    if verb is not None and verb != command.cmd:
        raise CommandWrongVerb(f"sent on verb {verb!r} but signed as {command.cmd!r}", "cmd")
    now = time.time() if now is None else now
    if command.expires_at - command.issued_at > max_ttl:
        raise CommandLifetimeTooLong(command.expires_at - command.issued_at, max_ttl)
    if now > command.expires_at:
        raise CommandExpired(command.expires_at, now)
    if command.issued_at > now + skew:
        raise CommandFromFuture(command.issued_at, now, skew)
    nonces.accept(command.nonce, command.issued_at, command.expires_at, now)
    return command


class NonceCache:
    """Nonces of accepted commands until they expire, bounded by `capacity` (see the module
    docstring for the floor that keeps eviction safe)."""

    __slots__ = ("capacity", "floor", "_seen", "evicted")

    def __init__(self, capacity: int = DEFAULT_NONCE_CAPACITY):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.floor = 0.0  # commands issued at or before this are refused
        self._seen: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # nonce -> (issued, expires)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, nonce: bytes) -> bool:
        return nonce in self._seen

    def check(self, nonce: bytes, issued_at: float) -> None:
        """Raise CommandReplayed if `nonce` may not be accepted; change nothing."""
        if nonce in self._seen:
            raise CommandReplayed(nonce, "was already accepted")
        if issued_at <= self.floor:
            raise CommandReplayed(nonce, f"issued at or before the replay window's floor ({self.floor:.3f})")

    def accept(self, nonce: bytes, issued_at: float, expires_at: float, now: float) -> None:
        """Check then record `nonce`; drop expired entries, evict (raising the floor) if full."""
        self.check(nonce, issued_at)
        self.prune(now)
        while len(self._seen) >= self.capacity:
            _old, (old_issued, _exp) = self._seen.popitem(last=False)
            self.floor = max(self.floor, old_issued)
            self.evicted += 1
        if issued_at <= self.floor:  # evicting may just have moved the floor past this command
            raise CommandReplayed(nonce, "older than every command the full replay window keeps")
        self._seen[nonce] = (issued_at, expires_at)

    def prune(self, now: float) -> int:
        """Forget nonces whose command has expired (it would be refused as expired anyway)."""
        dead = [n for n, (_i, exp) in self._seen.items() if exp < now]
        for n in dead:
            del self._seen[n]
        return len(dead)

    def to_state(self) -> dict:
        return {"floor": self.floor, "seen": [[n.hex(), i, e] for n, (i, e) in self._seen.items()]}

    @classmethod
    def from_state(cls, state: dict, capacity: int = DEFAULT_NONCE_CAPACITY) -> "NonceCache":
        cache = cls(capacity)
        cache.floor = float(state.get("floor") or 0.0)
        for item in (state.get("seen") or [])[-capacity:]:
            nonce, issued, expires = item
            cache._seen[bytes.fromhex(nonce)] = (float(issued), float(expires))
        return cache
