"""TLS for the TCP I/O gears (`io_tcp`, `io_iso8583`): config, SSL contexts, certificate reload.

Job: turn a gear's `tls` block into `ssl.SSLContext`s for a server or a client and keep them
current: `TlsMaterial.context()` re-reads the certificate, key and CA files when any of them
changed on disk (checked at most once per `RECHECK_SECONDS`, at connection time), so a
rotated certificate (a scenario reload, or just new files) applies to the next handshake while
established connections keep the session they have. A server context carries an SNI callback
that moves each new handshake onto the newest context, which is how a listening socket
created once serves rotated certificates without being closed.

The `tls` block (every path relative to the scenario's directory):
  cert, key           PEM certificate chain and private key: required for a server, optional
                      for a client (its certificate for mTLS)
  key_password_file   a file holding the key's passphrase (never a value in the scenario,
                      never argv); the key file itself must not be readable by others
  ca                  PEM bundle the peer is verified against (server: client certificates;
                      client: the server; default on a client: the system store)
  client_auth         server: none | optional | required (mTLS; needs `ca`)
  server_name         client: the name sent as SNI and checked against the certificate
                      (default: the host of `connect`)
  verify_peer         client: verify the server's certificate (default true; false is an
                      insecure opt-in, logged as a warning at every start)
  check_hostname      client: match the certificate to server_name (default true)
  min_version         "1.2" (default) or "1.3"
  ciphers             OpenSSL cipher string for TLS 1.2 (default: Python's secure default)
  handshake_timeout   a duration, default 10s

Contract: `TlsConfig.parse(block, scenario_dir, mode)` validates and raises ConfigError naming
the `tls.<key>`; `problems(block, mode)` lists config problems for a scenario check without
touching files. Context building errors (missing file, bad PEM, wrong passphrase, key not
matching the certificate) raise TlsError naming the file.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import time
from dataclasses import dataclass

from ..durations import parse_duration
from ..errors import ConfigError

__all__ = [
    "TlsConfig",
    "TlsMaterial",
    "TlsError",
    "build_context",
    "tls_schema",
    "problems",
    "RECHECK_SECONDS",
    "DEFAULT_HANDSHAKE_TIMEOUT",
]

RECHECK_SECONDS = 1.0  # how often, at most, certificate files are stat()ed for changes
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_PATH = {"type": "string", "description": "file path, relative to the scenario"}


class TlsError(ConfigError):
    """A TLS file cannot be used (missing, unreadable, readable by others, not PEM, wrong key)."""


def tls_schema() -> dict:
    """Schema of the `tls` block of a TCP gear."""
    return {
        "type": "object",
        "description": "TLS on the link (absent: plain TCP). See fluxrig.net.tls for every key.",
        "properties": {
            "cert": {**_PATH, "description": "PEM certificate chain (server: required; client: for mTLS)"},
            "key": {**_PATH, "description": "PEM private key (mode 600)"},
            "key_password_file": {**_PATH, "description": "file holding the key's passphrase"},
            "ca": {**_PATH, "description": "PEM CA bundle the peer is verified against"},
            "client_auth": {
                "type": "string",
                "enum": list(_CLIENT_AUTH),
                "description": "server: ask for client certificates (mTLS); needs ca",
            },
            "server_name": {"type": "string", "description": "client: SNI and the name checked in the certificate"},
            "verify_peer": {"type": "boolean", "description": "client: verify the server (false is insecure)"},
            "check_hostname": {"type": "boolean", "description": "client: match server_name to the certificate"},
            "min_version": {"type": "string", "enum": list(_VERSIONS), "description": "lowest TLS version"},
            "ciphers": {"type": "string", "description": "OpenSSL cipher string (TLS 1.2)"},
            "handshake_timeout": {"type": "string", "format": "duration", "description": "default 10s"},
        },
        "additionalProperties": False,
    }


def problems(block, mode: str):
    """(key, message) for every problem of a `tls` block that needs no file access."""
    if block is None:
        return
    if not isinstance(block, dict):
        yield "tls", "must be a mapping"
        return
    if mode == "server":
        for k in ("cert", "key"):
            if not block.get(k):
                yield f"tls.{k}", "a TLS server needs a certificate and its key"
        auth = block.get("client_auth", "none")
        if auth != "none" and not block.get("ca"):
            yield "tls.ca", f"client_auth={auth} needs ca (the CA that issued the client certificates)"
        for k in ("server_name", "verify_peer", "check_hostname"):
            if k in block:
                yield f"tls.{k}", "is a client key"
    else:
        if "client_auth" in block:
            yield "tls.client_auth", "is a server key (a client presents cert/key for mTLS)"
        if bool(block.get("cert")) != bool(block.get("key")):
            yield "tls.cert", "a client certificate needs both cert and key"
        if block.get("verify_peer") is False and block.get("ca"):
            yield "tls.verify_peer", "false ignores ca: drop one of them"
    if "key_password_file" in block and not block.get("key"):
        yield "tls.key_password_file", "without a key"


@dataclass(frozen=True)
class TlsConfig:
    mode: str
    cert: str | None = None
    key: str | None = None
    key_password_file: str | None = None
    ca: str | None = None
    client_auth: str = "none"
    server_name: str | None = None
    verify_peer: bool = True
    check_hostname: bool = True
    min_version: str = "1.2"
    ciphers: str | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    @classmethod
    def parse(cls, block: dict, scenario_dir: str, mode: str) -> TlsConfig:
        errs = list(problems(block, mode))
        if errs:
            key, msg = errs[0]
            raise ConfigError(msg, key)

        def path(k):
            v = block.get(k)
            if not v:
                return None
            return v if os.path.isabs(v) else os.path.join(scenario_dir, v)

        try:
            hs = parse_duration(block.get("handshake_timeout", "10s"))
        except ValueError as exc:
            raise ConfigError(str(exc), "tls.handshake_timeout") from None
        return cls(
            mode=mode,
            cert=path("cert"),
            key=path("key"),
            key_password_file=path("key_password_file"),
            ca=path("ca"),
            client_auth=block.get("client_auth", "none"),
            server_name=block.get("server_name"),
            verify_peer=block.get("verify_peer", True),
            check_hostname=block.get("check_hostname", True),
            min_version=block.get("min_version", "1.2"),
            ciphers=block.get("ciphers"),
            handshake_timeout=hs or DEFAULT_HANDSHAKE_TIMEOUT,
        )

    def files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert, self.key, self.key_password_file, self.ca) if p)


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise TlsError(f"cannot read the {what}: {exc.strerror}", path) from None
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise TlsError(f"the {what} is readable or writable by others; chmod 600 it", path)
    return data


def _check_readable(path: str, what: str) -> None:
    if not os.access(path, os.R_OK):
        raise TlsError(f"cannot read the {what}", path)


def build_context(cfg: TlsConfig) -> ssl.SSLContext:
    """A fresh SSLContext for `cfg` (raises TlsError naming the file that failed)."""
    server = cfg.mode == "server"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cfg.ciphers:
        try:
            ctx.set_ciphers(cfg.ciphers)
        except ssl.SSLError:
            raise TlsError(f"no cipher matches {cfg.ciphers!r}", "tls.ciphers") from None
    if cfg.cert:
        _check_readable(cfg.cert, "certificate")
        _read_secret_file(cfg.key, "private key")  # permission check; ssl reads it itself
        password = None
        if cfg.key_password_file:
            password = _read_secret_file(cfg.key_password_file, "key passphrase file").rstrip(b"\r\n")
        try:
            ctx.load_cert_chain(cfg.cert, cfg.key, password=password if password is not None else _no_password)
        except ssl.SSLError as exc:
            raise TlsError(
                f"certificate/key unusable ({exc.reason or exc}): wrong passphrase or key", cfg.key
            ) from None
        except OSError as exc:
            raise TlsError(f"cannot load: {exc.strerror or exc}", cfg.cert) from None
    if server:
        ctx.verify_mode = _CLIENT_AUTH[cfg.client_auth]
        if cfg.ca:
            _load_ca(ctx, cfg.ca)
    else:
        if not cfg.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = cfg.check_hostname
            if cfg.ca:
                _load_ca(ctx, cfg.ca)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx


def _no_password():
    # An encrypted key without key_password_file fails fast instead of prompting on a tty.
    raise TlsError("the private key is encrypted: give key_password_file", "tls.key")


def _load_ca(ctx: ssl.SSLContext, path: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load the CA bundle: {getattr(exc, 'strerror', None) or exc}", path) from None


def _stamp(paths) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class TlsMaterial:
    """The current SSLContext of one endpoint, rebuilt when its files change on disk."""

    def __init__(self, cfg: TlsConfig, log: logging.Logger, name: str):
        self.cfg = cfg
        self.log = log
        self.name = name
        self._current = build_context(cfg)  # errors at gear construction are config errors
        self._stamp = _stamp(cfg.files())
        self._checked = time.monotonic()
        self.reloads = 0
        self.reload_errors = 0
        self._outer: ssl.SSLContext | None = None
        if cfg.mode == "client" and not cfg.verify_peer:
            log.warning("%s: TLS verify_peer is false: the server is NOT authenticated (insecure opt-in)", name)

    def context(self) -> ssl.SSLContext:
        """The newest context, re-read from disk if a file changed (at most once a second)."""
        now = time.monotonic()
        if now - self._checked >= RECHECK_SECONDS:
            self._checked = now
            stamp = _stamp(self.cfg.files())
            if stamp != self._stamp:
                self.reload()
                self._stamp = stamp
        return self._current

    def reload(self) -> bool:
        """Re-read the files now; keep the running context if they do not load (logged)."""
        try:
            ctx = build_context(self.cfg)
        except (TlsError, ssl.SSLError, OSError) as exc:
            self.reload_errors += 1
            self.log.warning("%s: TLS files changed but do not load (%s); keeping the previous ones", self.name, exc)
            return False
        self._current = ctx
        self.reloads += 1
        self.log.info("%s: TLS certificates re-read", self.name)
        return True

    def server_context(self) -> ssl.SSLContext:
        """The context to listen with: built once, every handshake moved to the newest one."""
        if self._outer is None:
            outer = build_context(self.cfg)

            def _pick(sslobj, _server_name, _ctx):
                newest = self.context()
                if newest is not _ctx:
                    sslobj.context = newest
                return None

            outer.sni_callback = _pick
            self._outer = outer
        return self._outer

    def client_context(self) -> ssl.SSLContext:
        return self.context()

    def server_hostname(self, connect_host: str) -> str | None:
        """What a client sends as SNI and checks the certificate against."""
        if self.cfg.server_name:
            return self.cfg.server_name
        return connect_host or None

    def metrics(self) -> dict:
        return {"tls_reloads": self.reloads, "tls_reload_errors": self.reload_errors}
