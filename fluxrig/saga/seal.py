"""Card numbers at rest in the saga journal: sealed with a key from the Rack's state dir (sans-IO
apart from `FieldSeal.load`, which reads or creates the key file).

A reversal must carry the original's PAN (DE 2, or DE 34 extended), so the journal has to keep
it until the reversal is answered; it must not keep it in clear. Every journal event and parked
document goes through `FieldSeal` on its way to disk: each PAN field of a `fields` map becomes

    {"sealed": <XSalsa20-Poly1305 box of the PAN, 40 bytes of nonce and tag>, "masked": "411111******1111"}

(the masked form is what PCI DSS allows to be shown: the first six and last four digits), and is
opened again when the journal is recovered. Readers without the key (`fluxrig saf list|show`
beside a running Rack) show the masked form and never need the key. Track data, PIN blocks and
ICC data (DE 35, 36, 45, 52, 55) are never written at all: a reversal does not carry them
(fluxrig.saga.reversal.NEVER_COPIED) and an open request's journal entry leaves them out.

The key: KEY_BYTES random bytes in `<state_dir>/saga.key` (mode 0600, written atomically; the
conductor's `saf.key_file` may put it elsewhere, e.g. on a tmpfs or a systemd credential),
created on first use. It protects the journal's files wherever they are copied (backups,
support bundles, a disk image without the state dir's key) and keeps card numbers out of
anything that greps them; it does not protect against someone who can read the key file, who
can also run the Rack. A key file of the wrong size, or readable by group or others, is refused
(ConfigError naming it). A sealed PAN that does not open (key lost or replaced) is left out of
the recovered fields and counted (`unopened`): the reversal still carries DE 90, STAN and RRN.
"""

from __future__ import annotations

import itertools
import os
import stat

from nacl.bindings import crypto_secretbox, crypto_secretbox_open
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from ..errors import ConfigError
from ..fileutil import write_private_atomic
from ..iso8583.masking import mask_pan

__all__ = ["FieldSeal", "SEALED_FIELDS", "KEY_BYTES", "KEY_FILE", "is_sealed"]

SEALED_FIELDS = ("2", "34")
KEY_BYTES = SecretBox.KEY_SIZE
NONCE_BYTES = SecretBox.NONCE_SIZE
# Nonces: a random prefix per FieldSeal and a counter (never repeats under one key, and no
# system call per record: os.urandom per PAN cost more than the rest of the journaling).
NONCE_PREFIX_BYTES = NONCE_BYTES - 8
KEY_FILE = "saga.key"
SEALED, MASKED = "sealed", "masked"


def is_sealed(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get(SEALED), bytes)


class FieldSeal:
    """Seals and opens the PAN fields of journal events with one key."""

    __slots__ = ("_key", "_prefix", "_counter", "path", "unopened")

    def __init__(self, key: bytes, path: str = ""):
        if len(key) != KEY_BYTES:
            raise ConfigError(f"a saga key is {KEY_BYTES} bytes, not {len(key)}", key=path or "saf.key_file")
        self._key = bytes(key)
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        self._counter = itertools.count()
        self.path = path
        self.unopened = 0

    def _encrypt(self, data: bytes) -> bytes:
        """nonce + box (the layout nacl.secret.SecretBox.encrypt gives, which it can open)."""
        nonce = self._prefix + next(self._counter).to_bytes(8, "big")
        return nonce + crypto_secretbox(data, nonce, self._key)

    def _decrypt(self, sealed: bytes) -> bytes:
        return crypto_secretbox_open(sealed[NONCE_BYTES:], sealed[:NONCE_BYTES], self._key)

    @classmethod
    def load(cls, path: str) -> FieldSeal:
        """The key in `path`, created (0600, atomically) when absent."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            write_private_atomic(path, os.urandom(KEY_BYTES))
            fd = os.open(path, os.O_RDONLY)
        try:
            mode = os.fstat(fd).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"{path} is readable by group or others (mode {stat.S_IMODE(mode):o}); chmod 600 it", key=path
                )
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        return cls(key, path)

    # -- one fields map ----------------------------------------------------------------------------
    def seal_fields(self, fields: dict) -> dict:
        out = dict(fields)
        for k in SEALED_FIELDS:
            v = out.get(k)
            if isinstance(v, str) and v:
                out[k] = {SEALED: self._encrypt(v.encode()), MASKED: mask_pan(v)}
        return out

    def open_fields(self, fields: dict) -> dict:
        out = dict(fields)
        for k in SEALED_FIELDS:
            v = out.get(k)
            if is_sealed(v):
                try:
                    out[k] = self._decrypt(v[SEALED]).decode()
                except (CryptoError, UnicodeDecodeError, ValueError):
                    self.unopened += 1
                    del out[k]
        return out

    # -- events and documents (any map with a `fields` map, nested in lists and maps) -------------
    def seal(self, doc):
        return _walk(doc, self.seal_fields)

    def open(self, doc):
        return _walk(doc, self.open_fields)


def _walk(doc, fn, depth: int = 0):
    if depth > 4:
        return doc
    if isinstance(doc, list):
        return [_walk(v, fn, depth + 1) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    fields = out.get("fields")
    if isinstance(fields, dict):
        out["fields"] = fn(fields)
    trail = out.get("trail")
    if isinstance(trail, list):
        out["trail"] = _walk(trail, fn, depth + 1)
    return out
