"""Signed passports (`rack.flux`): what a Rack is allowed to be and to run, signed by the Mixer.

Format (ARCHITECTURE §8). A passport is a CBOR map `{"payload": bytes, "signature": bytes}`.
`payload` is itself CBOR (so the signed bytes are exactly the stored bytes, never re-encoded)
and holds:

    v                 format version (PASSPORT_FORMAT)
    serial            grows with every passport the Mixer signs for this Rack: passports are
                      ordered by serial alone, never by their time stamps
    rack_id, rack_name, status
    bus               {"user": <bus user name>, "password": <bus secret>}  (secret: never printed)
    scenario          the Rack's projection of the active scenario (a dict) or None
    scenario_version  "<meta.version>@<digest12>" or ""
    mixer_pub         the signing Mixer's Ed25519 public key (32 bytes)
    mixer_name
    issued_at, expires_at   unix seconds (float)

`signature` is Ed25519 over SIGNING_CONTEXT + payload: the context prefix keeps a passport
signature from being replayed as any other kind of signed object of the cluster key.

Trust. A Rack pins one or two Mixer keys (`snake.mixer_public_key` and
`snake.mixer_public_key_next` for rotation). When none is configured it trusts the key of the
first passport that verifies and writes it beside the passport (`<state_file>.pub`); every
later passport must be signed by a pinned key. `verify_passport` raises a PassportError
subclass (errors.py) and never returns an untrusted passport.

Expiry and clocks (sovereign continuity). `expires_at` limits what the Mixer accepts and
when it re-signs (at half-life, in heartbeat replies); it never stops a Rack: the Rack's
`PassportStore` verifies signature, pin and shape but not time, so a Rack offline for months,
or booting at 1970 without an RTC, still runs the last scenario it verified. A newer passport
must carry a higher serial for the same Rack (`PassportStale` otherwise, whatever its time
stamps say). `validity()` reports where the passport stands by the best time the Rack knows
(the Mixer's, else a plausible local clock, else "unknown": fluxrig/timesync.py), for the
heartbeat and `fluxrig status`; tools that judge a passport file on their own
(`fluxrig keys inspect`) still call `verify_passport(check_expiry=True)`.

The cluster key (Mixer side) is an Ed25519 seed stored hex-encoded in a 0600 file, with the
public key in `<file>.pub`. Everything here is sans-IO except the small file helpers.
"""

from __future__ import annotations

import binascii
import os
import time
from dataclasses import dataclass, field, replace

from nacl.signing import SigningKey

from .errors import (
    KeyFileError,
    PassportExpired,
    PassportMalformed,
    PassportPinMismatch,
    PassportSignatureInvalid,
    PassportStale,
)
from .fileutil import write_private_atomic
from .wire.envelope import EnvelopeErrors, open_envelope, sign_envelope
from .wire.vocab import RackStatus

__all__ = [
    "PASSPORT_FORMAT",
    "SIGNING_CONTEXT",
    "MAX_PASSPORT_BYTES",
    "DEFAULT_PASSPORT_TTL_S",
    "STATUSES",
    "Passport",
    "ClusterKey",
    "PassportStore",
    "sign_passport",
    "verify_passport",
    "decode_unverified",
    "parse_public_key",
    "masked_payload",
    "validity",
    "PassportValidity",
]

PASSPORT_FORMAT = 1
SIGNING_CONTEXT = b"fluxrig/passport/v1\x00"
# A projection of a large scenario still fits easily; anything bigger is not a passport.
MAX_PASSPORT_BYTES = 4 * 1024 * 1024
DEFAULT_PASSPORT_TTL_S = 30 * 24 * 3600.0
# Clock skew tolerated on issued_at so a Rack with a slightly late clock still accepts.
CLOCK_SKEW_S = 300.0
STATUSES = tuple(s for s in RackStatus if s not in (RackStatus.UNENROLLED, RackStatus.NEW))
SECRET_MASK = "********"


@dataclass(frozen=True, slots=True)
class Passport:
    """The verified contents of a passport (or the contents about to be signed)."""

    rack_id: str
    rack_name: str
    status: str
    bus_user: str = ""
    bus_password: str = field(default="", repr=False)
    scenario: dict | None = None
    scenario_version: str = ""
    mixer_pub: bytes = b""
    mixer_name: str = ""
    issued_at: float = 0.0
    expires_at: float = 0.0
    serial: int = 0

    def to_payload(self) -> dict:
        return {
            "v": PASSPORT_FORMAT,
            "serial": self.serial,
            "rack_id": self.rack_id,
            "rack_name": self.rack_name,
            "status": self.status,
            "bus": {"user": self.bus_user, "password": self.bus_password},
            "scenario": self.scenario,
            "scenario_version": self.scenario_version,
            "mixer_pub": self.mixer_pub,
            "mixer_name": self.mixer_name,
            "issued_at": float(self.issued_at),
            "expires_at": float(self.expires_at),
        }

    @classmethod
    def from_payload(cls, p: dict, path: str | None = None) -> Passport:
        if not isinstance(p, dict):
            raise PassportMalformed("payload is not a map", path)
        if p.get("v") != PASSPORT_FORMAT:
            raise PassportMalformed(f"unsupported passport format {p.get('v')!r}", path, "v")

        def text(key: str, allow_empty: bool = False) -> str:
            value = p.get(key)
            if not isinstance(value, str) or (not value and not allow_empty):
                raise PassportMalformed("missing or not text", path, key)
            return value

        bus = p.get("bus") or {}
        if not isinstance(bus, dict):
            raise PassportMalformed("not a map", path, "bus")
        status = text("status")
        if status not in STATUSES:
            raise PassportMalformed(f"unknown status {status!r}", path, "status")
        scenario = p.get("scenario")
        if scenario is not None and not isinstance(scenario, dict):
            raise PassportMalformed("not a map", path, "scenario")
        mixer_pub = p.get("mixer_pub")
        if not isinstance(mixer_pub, bytes) or len(mixer_pub) != 32:
            raise PassportMalformed("must be 32 bytes", path, "mixer_pub")
        for key in ("issued_at", "expires_at"):
            if not isinstance(p.get(key), (int, float)) or isinstance(p.get(key), bool):
                raise PassportMalformed("not a number", path, key)
        serial = p.get("serial")
        if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
            raise PassportMalformed("not a non-negative integer", path, "serial")
        return cls(
            rack_id=text("rack_id"),
            rack_name=text("rack_name"),
            status=status,
            bus_user=str(bus.get("user") or ""),
            bus_password=str(bus.get("password") or ""),
            scenario=scenario,
            scenario_version=text("scenario_version", allow_empty=True),
            mixer_pub=mixer_pub,
            mixer_name=str(p.get("mixer_name") or ""),
            issued_at=float(p["issued_at"]),
            expires_at=float(p["expires_at"]),
            serial=serial,
        )

    @property
    def mixer_pub_hex(self) -> str:
        return self.mixer_pub.hex()


def parse_public_key(text: str | bytes) -> bytes:
    """A 32-byte Ed25519 public key from hex (64 chars) or raw bytes; KeyFileError otherwise."""
    if isinstance(text, bytes) and len(text) == 32:
        return text
    s = text.decode() if isinstance(text, bytes) else text
    s = s.strip()
    try:
        raw = bytes.fromhex(s)
    except ValueError:
        raise KeyFileError(f"not a hex Ed25519 public key: {s[:20]!r}...") from None
    if len(raw) != 32:
        raise KeyFileError(f"an Ed25519 public key is 32 bytes (64 hex chars), got {len(raw)}")
    return raw


class ClusterKey:
    """The Mixer's Ed25519 cluster key. The file holds the 32-byte seed in hex (0600); the
    public key is written beside it as `<file>.pub` (hex) for operators to pin on Racks."""

    __slots__ = ("_sk", "path")

    def __init__(self, signing_key: SigningKey, path: str | None = None):
        self._sk = signing_key
        self.path = path

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(SigningKey.generate())

    @classmethod
    def load(cls, path: str) -> ClusterKey:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise KeyFileError(f"cannot read cluster key: {exc.strerror}", path) from None
        seed: bytes | None = None
        stripped = raw.strip()
        if len(stripped) in (64, 128):
            try:
                seed = binascii.unhexlify(stripped)[:32]
            except (binascii.Error, ValueError):
                seed = None
        if seed is None and len(raw) in (32, 64):
            seed = raw[:32]  # raw seed, or Go's seed+public layout
        if seed is None:
            raise KeyFileError("not an Ed25519 key (expected a 64-char hex seed)", path)
        return cls(SigningKey(seed), path)

    @classmethod
    def load_or_create(cls, path: str) -> ClusterKey:
        """Load the key, or create it (0600) when the file does not exist yet."""
        if os.path.exists(path):
            key = cls.load(path)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            key = cls.generate()
            key.path = path
            write_private_atomic(path, key._sk.encode().hex().encode() + b"\n")
        pub_path = path + ".pub"
        if not os.path.exists(pub_path):
            with open(pub_path, "w") as fh:
                fh.write(key.public_hex + "\n")
        return key

    @property
    def public_key(self) -> bytes:
        return bytes(self._sk.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    def sign(self, message: bytes) -> bytes:
        return self._sk.sign(message).signature


def sign_passport(key: ClusterKey, passport: Passport) -> bytes:
    """Envelope bytes for `passport`, with `mixer_pub` set to the signing key."""
    passport = replace(passport, mixer_pub=key.public_key)
    return sign_envelope(key.sign, SIGNING_CONTEXT, passport.to_payload())


def _errors(path: str | None) -> EnvelopeErrors:
    return EnvelopeErrors(
        malformed=lambda message, key=None: PassportMalformed(message, path, key),
        unsigned=lambda message: PassportMalformed(message, path),
        not_pinned=lambda presented, pinned: PassportPinMismatch(presented, pinned, path),
        forged=lambda message: PassportSignatureInvalid(message, path),
    )


def decode_unverified(data: bytes, path: str | None = None) -> dict:
    """The raw payload map WITHOUT checking the signature (for `keys inspect` only)."""
    return open_envelope(data, max_bytes=MAX_PASSPORT_BYTES, errors=_errors(path)).body


def verify_passport(
    data: bytes,
    pinned: list[bytes] | tuple[bytes, ...],
    now: float | None = None,
    path: str | None = None,
    check_expiry: bool = True,
) -> Passport:
    """Verify `data` against the pinned keys and return the Passport.

    `pinned` empty means "trust the key the passport names" (trust on first use); the caller
    is then responsible for pinning `passport.mixer_pub`. Raises PassportMalformed,
    PassportPinMismatch, PassportSignatureInvalid or PassportExpired.
    """
    errors = _errors(path)
    env = open_envelope(data, max_bytes=MAX_PASSPORT_BYTES, errors=errors)
    passport = Passport.from_payload(env.body, path)
    env.verify(pinned, SIGNING_CONTEXT, errors=errors, trust_named_key=True)
    if check_expiry:
        now = time.time() if now is None else now
        if passport.expires_at and now > passport.expires_at:
            raise PassportExpired(passport.expires_at, now, path)
        if passport.issued_at > now + CLOCK_SKEW_S:
            raise PassportMalformed(
                f"issued {passport.issued_at - now:.0f}s in the future (clock skew > {CLOCK_SKEW_S:.0f}s)",
                path,
                "issued_at",
            )
    return passport


class PassportValidity:
    """Where a passport stands in time (reported only: the Rack runs it in every state)."""

    VALID = "valid"
    RENEW = "renew"  # past half-life: the Mixer re-signs it in its next heartbeat reply
    EXPIRED = "expired"  # the Mixer would not accept it any more; the Rack still runs it
    UNKNOWN = "unknown"  # no trustworthy clock (unset, distant past) and no Mixer time yet


def validity(passport: Passport | None, now: float | None, source: str = "local") -> dict:
    """A small report of `passport` judged at `now` (None = no trustworthy time)."""
    if passport is None:
        return {"serial": 0, "state": "none", "clock": source}
    if now is None:
        state = PassportValidity.UNKNOWN
    elif passport.expires_at and now > passport.expires_at:
        state = PassportValidity.EXPIRED
    elif passport.expires_at and now > passport.issued_at + (passport.expires_at - passport.issued_at) / 2:
        state = PassportValidity.RENEW
    else:
        state = PassportValidity.VALID
    return {
        "serial": passport.serial,
        "state": state,
        "clock": source,
        "issued_at": passport.issued_at,
        "expires_at": passport.expires_at,
        "expires_in_s": round(passport.expires_at - now, 1) if now is not None and passport.expires_at else None,
    }


def masked_payload(body: dict) -> dict:
    """A printable copy of a payload map: secrets masked, bytes as hex, scenario summarised."""
    out: dict = {}
    for key, value in body.items():
        if key == "bus" and isinstance(value, dict):
            out[key] = {k: (SECRET_MASK if k == "password" and v else v) for k, v in value.items()}
        elif isinstance(value, bytes):
            out[key] = value.hex()
        else:
            out[key] = value
    return out


class PassportStore:
    """The Rack's passport file and its pin file in `state_dir`.

    `configured` keys (from fluxrig.toml) take precedence over the trust-on-first-use pin
    file. Files are written atomically with mode 0600.
    """

    __slots__ = ("state_dir", "path", "pin_path", "configured")

    def __init__(self, state_dir: str, file_name: str = "rack.flux", configured: list[bytes] | None = None):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, file_name)
        self.pin_path = self.path + ".pub"
        self.configured = [k for k in (configured or []) if k]

    def pins(self) -> list[bytes]:
        if self.configured:
            return list(self.configured)
        try:
            with open(self.pin_path) as fh:
                lines = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
        except FileNotFoundError:
            return []
        try:
            return [parse_public_key(ln) for ln in lines]
        except KeyFileError as exc:
            raise KeyFileError(str(exc), self.pin_path) from None

    def verify(self, data: bytes, now: float | None = None) -> Passport:
        """Verify against the pins (TOFU when there are none) without saving anything. Time
        is not judged (see the module docstring): `now` is accepted for older callers only."""
        return verify_passport(data, self.pins(), path=self.path, check_expiry=False)

    def accept(self, data: bytes, now: float | None = None) -> Passport:
        """Verify `data`, pin its key on first use, save it; return the Passport. For the
        Rack the stored passport belongs to, the serial must grow (PassportStale otherwise);
        the very bytes stored are accepted again (a retried push)."""
        passport = self.verify(data, now)
        stored = self.raw()
        if stored is not None and stored != bytes(data):
            try:
                current = verify_passport(stored, self.pins(), path=self.path, check_expiry=False)
            except Exception:  # a stored file that no longer verifies orders nothing
                current = None
            if current is not None and current.rack_id == passport.rack_id and passport.serial <= current.serial:
                raise PassportStale(passport.serial, current.serial, self.path)
        os.makedirs(self.state_dir, exist_ok=True)
        if not self.configured and not os.path.exists(self.pin_path):
            write_private_atomic(self.pin_path, (passport.mixer_pub_hex + "\n").encode())
        write_private_atomic(self.path, bytes(data))
        return passport

    def load(self, now: float | None = None) -> Passport | None:
        """The stored passport, verified; None when there is none. Raises PassportError when
        the stored file does not verify (never silently ignored)."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return self.verify(data, now)

    def raw(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def wipe(self, keep_pin: bool = True) -> None:
        """Forget the passport (the Mixer removed this Rack). The pin stays unless told."""
        paths = [self.path] if keep_pin else [self.path, self.pin_path]
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
