"""The enrollment bundle: everything a Rack needs to join a Mixer, as one string (or one file).

Job. Replace trust on first use (issue 12 item 3). The Mixer writes a bundle per enrollment
token (`fluxrig-mixer tokens create`, and the first-start token in `<state_dir>/enroll-bundle`);
the operator hands it to the Rack as `snake.enrollment_bundle` (a path to the file, or the
string itself). The Rack then knows, before it dials anything:

    urls        the Snake URLs (tls://host:port, tried in order)
    ca_pem      the cluster CA that signed the Snake's certificate (TLS is verified against it)
    ca_sha256   SHA-256 of that CA's DER: checked here against ca_pem, and printed by the
                Mixer so an operator can compare it out of band
    mixer_keys  the Mixer's Ed25519 public key(s), hex: pinned before the first passport,
                so whoever answers first cannot sign the Rack's scenarios
    token       the enrollment token (a secret: a bundle file is 0600, never put in argv)
    mixer       the Mixer's name (for messages only)

Format: `fluxrig-enroll-v1:` + base64url (no padding) of a JSON object with those keys. Text,
so it survives copy and paste, environment variables and TOML strings. Sans-IO:
`encode_bundle` and `decode_bundle` work on strings; `read_bundle` accepts a path or a string.
Every problem raises BundleError naming the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import ssl
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = [
    "BUNDLE_PREFIX",
    "MAX_BUNDLE_CHARS",
    "Bundle",
    "BundleError",
    "encode_bundle",
    "decode_bundle",
    "read_bundle",
    "ca_der_sha256",
]

BUNDLE_PREFIX = "fluxrig-enroll-v1:"
# A CA certificate, a few URLs and keys: far below this. Anything bigger is not a bundle.
MAX_BUNDLE_CHARS = 64 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ConfigError):
    """An enrollment bundle that cannot be used; `key` names the field (or the config key)."""

    def __init__(self, message: str, key: str = "snake.enrollment_bundle"):
        super().__init__(message, key)


@dataclass(frozen=True, slots=True)
class Bundle:
    urls: tuple[str, ...]
    ca_pem: str
    ca_sha256: str
    mixer_keys: tuple[str, ...]
    token: str = field(default="", repr=False)
    mixer: str = ""

    def to_dict(self) -> dict:
        return {
            "v": 1,
            "urls": list(self.urls),
            "ca_pem": self.ca_pem,
            "ca_sha256": self.ca_sha256,
            "mixer_keys": list(self.mixer_keys),
            "token": self.token,
            "mixer": self.mixer,
        }

    @property
    def mixer_key_bytes(self) -> list[bytes]:
        return [bytes.fromhex(k) for k in self.mixer_keys]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this bundle's CA (host names checked)."""
        return ssl.create_default_context(cadata=self.ca_pem)


def ca_der_sha256(ca_pem: str) -> str:
    """SHA-256 (hex) of the DER of the first certificate in `ca_pem`."""
    try:
        der = ssl.PEM_cert_to_DER_cert(ca_pem.strip() + "\n")
    except (ValueError, binascii.Error) as exc:
        raise BundleError(f"ca_pem is not a PEM certificate: {exc}", "ca_pem") from None
    return hashlib.sha256(der).hexdigest()


def encode_bundle(bundle: Bundle) -> str:
    raw = json.dumps(bundle.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    return BUNDLE_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_bundle(text: str) -> Bundle:
    """Parse and check a bundle string; BundleError naming what is wrong."""
    text = (text or "").strip()
    if len(text) > MAX_BUNDLE_CHARS:
        raise BundleError(f"longer than {MAX_BUNDLE_CHARS} characters: not a bundle")
    if not text.startswith(BUNDLE_PREFIX):
        raise BundleError(f"does not start with {BUNDLE_PREFIX!r} (copy the whole bundle the Mixer wrote)")
    body = text[len(BUNDLE_PREFIX) :]
    try:
        doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise BundleError(f"not base64url JSON (truncated when copied?): {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise BundleError(f"unsupported bundle version {doc.get('v') if isinstance(doc, dict) else None!r}", "v")

    def strings(key: str) -> tuple[str, ...]:
        value = doc.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(x, str) and x for x in value):
            raise BundleError("must be a non-empty list of strings", key)
        return tuple(value)

    urls = strings("urls")
    for u in urls:
        if not u.startswith(("tls://", "nats://")):
            raise BundleError(f"{u!r} is not a tls:// or nats:// URL", "urls")
    keys = tuple(k.lower() for k in strings("mixer_keys"))
    for k in keys:
        if not _HEX64.match(k):
            raise BundleError(f"{k[:16]!r}... is not a 64-hex-char Ed25519 public key", "mixer_keys")
    ca_pem = doc.get("ca_pem")
    if not isinstance(ca_pem, str) or "BEGIN CERTIFICATE" not in ca_pem:
        raise BundleError("missing or not a PEM certificate", "ca_pem")
    want = str(doc.get("ca_sha256") or "").lower()
    got = ca_der_sha256(ca_pem)
    if want != got:
        raise BundleError(f"does not match ca_pem (bundle says {want[:16]}..., the CA is {got[:16]}...)", "ca_sha256")
    token = doc.get("token", "")
    if not isinstance(token, str):
        raise BundleError("not a string", "token")
    return Bundle(urls, ca_pem, got, keys, token, str(doc.get("mixer") or ""))


def read_bundle(value: str) -> Bundle:
    """`value` is the bundle string itself or the path of a file holding it."""
    value = (value or "").strip()
    if value.startswith(BUNDLE_PREFIX):
        return decode_bundle(value)
    try:
        with open(value, encoding="utf-8") as fh:
            text = fh.read(MAX_BUNDLE_CHARS + 1)
    except OSError as exc:
        raise BundleError(f"cannot read the bundle file {value!r}: {exc.strerror or exc}") from None
    if os.name == "posix":
        try:
            if os.stat(value).st_mode & 0o077:
                # Not fatal (the operator may have just copied it), but it holds a token.
                import logging

                logging.getLogger("fluxrig.agent").warning(
                    "enrollment bundle %s is readable by group/other: it holds a token; chmod 600 it", value
                )
        except OSError:
            pass
    return decode_bundle(text)
