"""Signed control commands (kill switch, shutdown, log level): format, signing and verification, sans-IO.

The Mixer sends a command on `flux.ctrl.<rack>.<verb>` (every verb of CommandVerb: kill,
revive, gear-stop, conn-close, shutdown, log-level, saf); the Rack acts on it only when it
verifies. Bus permissions already keep other Racks off that subject, but a Rack must not
have to trust the bus: a command is signed by the Mixer's Ed25519 cluster key (the key that
signs passports, fluxrig.passport.ClusterKey) and checked against the Rack's pinned key(s).

Format. A CBOR map `{"payload": bytes, "signature": bytes}` (the passport's envelope shape).
`payload` is CBOR, so the signed bytes are exactly the bytes sent, never re-encoded:

    v           CTRL_FORMAT
    cmd         one of COMMANDS, and equal to the subject's <verb>
    rack_id     the target Rack's id: a command for another Rack never verifies here
    rack        the target's name when signed (informational: names change on rename)
    args        {"gear": str, "conn_id": str, "reason": str, "level": str, "serial": int,
                 "op": str, "saga": str}
                `level` for log-level (a LogLevel); `serial` for kill and revive: the Mixer's
                kill-state serial, which orders them (a Rack ignores one older than the state
                it has; 0 = unordered, from a Mixer before level-triggered kill state); `op`
                (a SafOp) and `saga` (a reversal id, for show, retry and park) for saf, whose
                `gear` optionally names one conductor
    nonce       NONCE_BYTES random bytes: a command is accepted at most once
    issued_at, expires_at    unix seconds; lifetime at most MAX_COMMAND_TTL_S
    mixer_pub   the 32-byte key that signed

`signature` is Ed25519 over CTRL_SIGNING_CONTEXT + payload. The context differs from the
passport's, so a passport signature can never pass as a command signature or the reverse.

Freshness is judged by the caller's `now` and `skew`: the Rack passes the Mixer's time as it
learned it from signed heartbeat replies and the error window (fluxrig/timesync.py), so its
own clock does not matter once synced.

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

from .errors import FluxError
from .passport import CLOCK_SKEW_S, ClusterKey
from .wire.envelope import EnvelopeErrors, open_envelope, sign_envelope
from .wire.vocab import CommandVerb, LogLevel, SafOp

__all__ = [
    "CTRL_FORMAT",
    "CTRL_SIGNING_CONTEXT",
    "COMMANDS",
    "CMD_KILL",
    "CMD_REVIVE",
    "CMD_GEAR_STOP",
    "CMD_CONN_CLOSE",
    "CMD_SHUTDOWN",
    "CMD_LOG_LEVEL",
    "CMD_SAF",
    "SAF_OPS",
    "KILL_STATE_COMMANDS",
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
    "RefusalLog",
    "REFUSAL_LOGS_PER_MINUTE",
]

CTRL_FORMAT = 1
CTRL_SIGNING_CONTEXT = b"fluxrig/ctrl/v1\x00"
# The command names are the subject verbs (one list: fluxrig.wire.vocab.CommandVerb).
CMD_KILL, CMD_REVIVE, CMD_GEAR_STOP, CMD_CONN_CLOSE, CMD_SHUTDOWN, CMD_LOG_LEVEL, CMD_SAF = CommandVerb
SAF_OPS = tuple(SafOp)
# A reversal id is a UUIDv7 in hex (32 characters); a little room for other id formats.
MAX_SAGA_ID_CHARS = 64
COMMANDS = tuple(CommandVerb)
# The verbs that set the level-triggered kill state (ordered by `serial`; the Mixer re-sends
# the desired one in heartbeat replies until the Rack reports it).
KILL_STATE_COMMANDS = (CMD_KILL, CMD_REVIVE)
# A command is a few hundred bytes; anything much larger is not one (and is not decoded).
MAX_COMMAND_BYTES = 4096
MAX_REASON_CHARS = 500
MAX_NAME_CHARS = 200
NONCE_BYTES = 16
DEFAULT_COMMAND_TTL_S = 60.0
# The nonce cache holds each nonce for the command's lifetime, so the lifetime is capped.
MAX_COMMAND_TTL_S = 600.0
DEFAULT_NONCE_CAPACITY = 4096
# Refused control messages are logged at most this often (then one line says how many were not).
REFUSAL_LOGS_PER_MINUTE = 60
# Kill-state serials are a BIGINT on the Mixer.
MAX_SERIAL = 2**63


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
        super().__init__(
            f"signed by key {presented[:16]}..., which is not pinned "
            f"(pinned: {', '.join(p[:16] + '...' for p in pinned) or 'none'})"
        )


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
    level: str = ""
    serial: int = 0
    op: str = ""
    saga: str = ""

    def to_payload(self) -> dict:
        args = {"gear": self.gear, "conn_id": self.conn_id, "reason": self.reason}
        if self.level:
            args["level"] = self.level
        if self.serial:
            args["serial"] = int(self.serial)
        if self.op:
            args["op"] = self.op
        if self.saga:
            args["saga"] = self.saga
        return {
            "v": CTRL_FORMAT,
            "cmd": self.cmd,
            "rack_id": self.rack_id,
            "rack": self.rack,
            "args": args,
            "nonce": self.nonce,
            "issued_at": float(self.issued_at),
            "expires_at": float(self.expires_at),
            "mixer_pub": self.mixer_pub,
        }

    def summary(self) -> dict:
        """A JSON-friendly view (for logs, heartbeats and API answers)."""
        out = {
            "cmd": self.cmd,
            "rack": self.rack,
            "nonce": self.nonce.hex(),
            "reason": self.reason,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }
        if self.gear:
            out["gear"] = self.gear
        if self.conn_id:
            out["conn_id"] = self.conn_id
        if self.level:
            out["level"] = self.level
        if self.serial:
            out["serial"] = self.serial
        if self.op:
            out["op"] = self.op
        if self.saga:
            out["saga"] = self.saga
        return out


def _check_args(cmd: str, gear: str, conn_id: str, level: str = "", serial: int = 0, op: str = "",
                saga: str = "") -> None:  # fmt: skip
    if cmd not in COMMANDS:
        raise CommandMalformed(f"unknown command {cmd!r}; one of {', '.join(COMMANDS)}", "cmd")
    if cmd == CMD_SAF:
        if op not in SAF_OPS:
            raise CommandMalformed(f"saf op {op!r} is not one of {', '.join(SAF_OPS)}", "args.op")
        if op != SafOp.LIST and not saga:
            raise CommandMalformed(f"saf {op} names no reversal", "args.saga")
        if len(saga) > MAX_SAGA_ID_CHARS:
            raise CommandMalformed(f"longer than {MAX_SAGA_ID_CHARS}", "args.saga")
    elif op or saga:
        raise CommandMalformed(f"{cmd} takes no saf op or reversal id", "args.op" if op else "args.saga")
    if cmd == CMD_LOG_LEVEL:
        try:
            LogLevel.parse(level)
        except ValueError as exc:
            raise CommandMalformed(str(exc), "args.level") from None
    elif level:
        raise CommandMalformed(f"{cmd} takes no level", "args.level")
    if serial and cmd not in KILL_STATE_COMMANDS:
        raise CommandMalformed(f"{cmd} takes no kill-state serial", "args.serial")
    if cmd == CMD_GEAR_STOP and not gear:
        raise CommandMalformed("gear-stop names no gear", "args.gear")
    if cmd == CMD_CONN_CLOSE and not conn_id:
        # An empty id means "any link" to a serial gear: never let a remote command say that.
        raise CommandMalformed("conn-close names no connection", "args.conn_id")


def new_command(
    cmd: str,
    rack_id: str,
    rack: str = "",
    *,
    gear: str = "",
    conn_id: str = "",
    reason: str = "",
    level: str = "",
    serial: int = 0,
    op: str = "",
    saga: str = "",
    ttl: float = DEFAULT_COMMAND_TTL_S,
    now: float | None = None,
) -> Command:
    """A fresh, unsigned command with a random nonce, valid for `ttl` seconds from `now`."""
    _check_args(cmd, gear, conn_id, level, serial, op, saga)
    level = str(LogLevel.parse(level)) if level else ""
    if not 0 < ttl <= MAX_COMMAND_TTL_S:
        raise CommandLifetimeTooLong(ttl, MAX_COMMAND_TTL_S)
    now = time.time() if now is None else now
    return Command(
        cmd,
        rack_id,
        rack,
        gear,
        conn_id,
        reason[:MAX_REASON_CHARS],
        os.urandom(NONCE_BYTES),
        now,
        now + ttl,
        level=level,
        serial=int(serial),
        op=str(op),
        saga=saga,
    )


def sign_command(key: ClusterKey, command: Command) -> bytes:
    """Envelope bytes for `command`, signed by `key` (which also becomes `mixer_pub`)."""
    return sign_envelope(key.sign, CTRL_SIGNING_CONTEXT, replace(command, mixer_pub=key.public_key).to_payload())


# -- verification --------------------------------------------------------------------------------

_ERRORS = EnvelopeErrors(
    malformed=CommandMalformed,
    unsigned=CommandUnsigned,
    not_pinned=CommandKeyNotPinned,
    forged=CommandForged,
)


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
    level = _field(args, "level", str, MAX_NAME_CHARS) if args.get("level") is not None else ""
    serial = _field(args, "serial", int) if args.get("serial") is not None else 0
    op = _field(args, "op", str, MAX_NAME_CHARS) if args.get("op") is not None else ""
    saga = _field(args, "saga", str, MAX_SAGA_ID_CHARS) if args.get("saga") is not None else ""
    if not 0 <= serial < MAX_SERIAL:
        raise CommandMalformed(f"must be in [0, {MAX_SERIAL})", "args.serial")
    cmd = _field(body, "cmd", str, MAX_NAME_CHARS)
    _check_args(cmd, gear, conn_id, level, serial, op, saga)
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
        level=level,
        serial=serial,
        op=op,
        saga=saga,
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
    nonces: NonceCache,
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
    env = open_envelope(data, max_bytes=MAX_COMMAND_BYTES, errors=_ERRORS)
    command = _parse(env.body)
    env.verify(pinned, CTRL_SIGNING_CONTEXT, errors=_ERRORS)
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
    def from_state(cls, state: dict, capacity: int = DEFAULT_NONCE_CAPACITY) -> NonceCache:
        cache = cls(capacity)
        cache.floor = float(state.get("floor") or 0.0)
        for item in (state.get("seen") or [])[-capacity:]:
            nonce, issued, expires = item
            cache._seen[bytes.fromhex(nonce)] = (float(issued), float(expires))
        return cache


class RefusalLog:
    """Refused control messages: counted by reason, logged at WARNING at most `per_minute`
    times a minute, then one line with how many were not logged (an attacker flooding a
    control subject cannot flood the journal, nor the telemetry it is shipped in)."""

    __slots__ = ("logger", "what", "per_minute", "clock", "refused", "refused_by", "_window")

    def __init__(self, logger, what: str, per_minute: int = REFUSAL_LOGS_PER_MINUTE, clock=time.monotonic):
        self.logger = logger
        self.what = what
        self.per_minute = per_minute
        self.clock = clock
        self.refused = 0
        self.refused_by: dict[str, int] = {}
        self._window = (float("-inf"), 0)  # (minute start, refusals logged in it)

    def note(self, verb: str, reason: str, detail) -> None:
        self.refused += 1
        self.refused_by[reason] = self.refused_by.get(reason, 0) + 1
        now = self.clock()
        start, logged = self._window
        if not 0.0 <= now - start < 60.0:  # a new minute (or the clock went back)
            if logged > self.per_minute:
                self.logger.warning("%s: %d more refusals were not logged", self.what, logged - self.per_minute)
            start, logged = now, 0
        logged += 1
        self._window = (start, logged)
        if logged <= self.per_minute:
            self.logger.warning("%s: %s ignored (%s): %s", self.what, verb, reason, detail)

    def status(self) -> dict:
        return {"refused": self.refused, "refused_by": dict(self.refused_by)}
