"""The one signed envelope of the cluster: Ed25519 over a signing context, checked against pinned keys.

Passports (fluxrig/passport.py) and control commands (fluxrig/ctrl.py) are both a CBOR map
`{"payload": bytes, "signature": bytes}` whose `payload` is CBOR naming its signer in
`mixer_pub` (32 bytes). The signed bytes are exactly the bytes sent, never re-encoded, and the
signature covers `context + payload`: each kind of object has its own context, so a passport
signature can never pass as a command's or the reverse.

Two steps, because each kind checks its own payload fields between them:

    env = open_envelope(data, max_bytes=..., errors=...)   # shape and size only
    ...parse env.body...
    env.verify(pinned, context, errors=..., trust_named_key=False)

`trust_named_key` (trust on first use) is for a passport only, and only when nothing is pinned;
a command is never trusted that way. Every refusal is raised through `errors`, so each kind keeps
its own typed errors (PassportMalformed, CommandForged, ...) while the checks exist once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cbor2
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ..errors import RemoteProtocolError

__all__ = [
    "SIGNATURE_BYTES",
    "KEY_BYTES",
    "EnvelopeError",
    "EnvelopeErrors",
    "SignedEnvelope",
    "open_envelope",
    "sign_envelope",
]

SIGNATURE_BYTES = 64
KEY_BYTES = 32


class EnvelopeError(RemoteProtocolError):
    """A signed envelope was refused; `reason` is malformed, unsigned, pin or signature, `key`
    names the payload key at fault. Kinds raise their own subclasses through EnvelopeErrors."""

    def __init__(self, message: str, reason: str = "malformed", key: str | None = None):
        self.reason = reason
        self.key = key
        super().__init__(f"{message} (key {key!r})" if key else message)


def _default_malformed(message: str, key: str | None = None) -> Exception:
    return EnvelopeError(message, "malformed", key)


def _default_unsigned(message: str) -> Exception:
    return EnvelopeError(message, "unsigned")


def _default_not_pinned(presented: str, pinned: list[str]) -> Exception:
    return EnvelopeError(f"signed by key {presented[:16]}..., which is not pinned", "pin", "mixer_pub")


def _default_forged(message: str) -> Exception:
    return EnvelopeError(message, "signature")


@dataclass(frozen=True, slots=True)
class EnvelopeErrors:
    """How a kind of envelope names its refusals (each returns the exception to raise)."""

    malformed: Callable[..., Exception] = _default_malformed  # (message, key=None)
    unsigned: Callable[[str], Exception] = _default_unsigned
    not_pinned: Callable[[str, list[str]], Exception] = _default_not_pinned  # (presented hex, pinned hex)
    forged: Callable[[str], Exception] = _default_forged


DEFAULT_ERRORS = EnvelopeErrors()


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    """An opened envelope: the signed payload bytes, its signature and the decoded payload map."""

    payload: bytes
    signature: bytes
    body: dict

    @property
    def signer(self) -> bytes | None:
        key = self.body.get("mixer_pub")
        return key if isinstance(key, bytes) and len(key) == KEY_BYTES else None

    def verify(
        self,
        pinned: Sequence[bytes],
        context: bytes,
        *,
        errors: EnvelopeErrors = DEFAULT_ERRORS,
        trust_named_key: bool = False,
    ) -> bytes:
        """Check the signer against `pinned` and the signature over `context + payload`; return
        the signer's key. With nothing pinned only `trust_named_key` lets the named key sign."""
        signer = self.signer
        if signer is None:
            raise errors.malformed(f"must be {KEY_BYTES} bytes", "mixer_pub")
        if (pinned or not trust_named_key) and signer not in pinned:
            raise errors.not_pinned(signer.hex(), [k.hex() for k in pinned])
        try:
            VerifyKey(signer).verify(context + self.payload, self.signature)
        except BadSignatureError:
            raise errors.forged("signature does not verify (tampered or forged)") from None
        return signer


def open_envelope(data, *, max_bytes: int, errors: EnvelopeErrors = DEFAULT_ERRORS) -> SignedEnvelope:
    """Check the shape `{payload: CBOR map bytes, signature: 64 bytes}` within `max_bytes`;
    nothing is verified yet (see SignedEnvelope.verify)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise errors.malformed("must be bytes")
    if len(data) > max_bytes:
        raise errors.malformed(f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        env = cbor2.loads(bytes(data))
    except Exception as exc:  # cbor2 raises several types for garbage
        raise errors.malformed(f"not CBOR: {exc}") from None
    if not isinstance(env, dict):
        raise errors.malformed("not an envelope {payload, signature}")
    if not env.get("signature"):
        raise errors.unsigned("no signature: it must be signed by the Mixer")
    payload, signature = env.get("payload"), env["signature"]
    if (
        set(env) != {"payload", "signature"}
        or not isinstance(payload, bytes)
        or not isinstance(signature, bytes)
        or len(signature) != SIGNATURE_BYTES
    ):
        raise errors.malformed(f"not an envelope {{payload: bytes, signature: {SIGNATURE_BYTES} bytes}}")
    try:
        body = cbor2.loads(payload)
    except Exception as exc:
        raise errors.malformed(f"payload is not CBOR: {exc}") from None
    if not isinstance(body, dict):
        raise errors.malformed("payload is not a map")
    return SignedEnvelope(payload, signature, body)


def sign_envelope(sign: Callable[[bytes], bytes], context: bytes, body: dict) -> bytes:
    """Envelope bytes for `body` (which must name its signer in `mixer_pub`); `sign` returns
    the 64-byte Ed25519 signature of its argument (fluxrig.passport.ClusterKey.sign)."""
    payload = cbor2.dumps(body)
    return cbor2.dumps({"payload": payload, "signature": sign(context + payload)})
