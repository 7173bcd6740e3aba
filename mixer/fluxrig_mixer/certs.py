"""`fluxrig-mixer certs init`: a private CA and a server certificate for the Snake (TLS).

Creates, in `<state_dir>/certs` unless told otherwise:

    ca.pem / ca-key.pem          the cluster CA (ECDSA P-256, 10 years); the key is 0600
    server.pem / server-key.pem  the Snake's certificate, signed by the CA, for the given
                                 host names and addresses (always localhost and 127.0.0.1)
    <name>.pem / <name>-key.pem  optional client certificates (for `snake.tls_verify`, mTLS)

Racks trust the Snake with `snake.root_ca_file = ".../ca.pem"` in fluxrig.toml. Existing
files are never overwritten unless `force=True`: replacing a CA silently would cut every Rack
off. Uses `cryptography` only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fluxrig.errors import FluxError

__all__ = ["CertError", "init_certs", "issue_client_cert", "CA_DAYS", "LEAF_DAYS"]

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity TLS clients commonly accept for a leaf


class CertError(FluxError):
    """Certificate files could not be created or read; `path` names the file."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def _write(path: str, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _load_ca(cert_dir: str):
    ca_path, key_path = os.path.join(cert_dir, "ca.pem"), os.path.join(cert_dir, "ca-key.pem")
    try:
        with open(ca_path, "rb") as fh:
            ca = x509.load_pem_x509_certificate(fh.read())
        with open(key_path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except FileNotFoundError as exc:
        raise CertError("CA not found; run `fluxrig-mixer certs init` first", exc.filename) from None
    except ValueError as exc:
        raise CertError(f"not a PEM certificate/key: {exc}", ca_path) from None
    return ca, key


def _leaf(ca, ca_key, common_name: str, sans: list, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _sans(hosts: list[str]) -> list:
    out, seen = [], set()
    for h in ["localhost", "127.0.0.1", *hosts]:
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def init_certs(cert_dir: str, hosts: list[str] | None = None, force: bool = False, cluster_name: str = "fluxrig") -> dict:
    """Create the CA (unless present) and a server certificate. Returns the file paths."""
    os.makedirs(cert_dir, exist_ok=True)
    ca_path, ca_key_path = os.path.join(cert_dir, "ca.pem"), os.path.join(cert_dir, "ca-key.pem")
    srv_path, srv_key_path = os.path.join(cert_dir, "server.pem"), os.path.join(cert_dir, "server-key.pem")
    if os.path.exists(srv_path) and not force:
        raise CertError("already exists; pass --force to issue a new server certificate", srv_path)
    if os.path.exists(ca_path) and not force:
        ca, ca_key = _load_ca(cert_dir)
    elif os.path.exists(ca_path) and force:
        ca, ca_key = _load_ca(cert_dir)  # keep the CA: Racks already trust it
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} cluster CA")])
        now = _now()
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM), private=False)
    hosts = list(hosts or []) + [socket.gethostname()]
    cert, key = _leaf(ca, ca_key, "fluxrig-snake", _sans(hosts), server=True)
    _write(srv_key_path, _key_pem(key), private=True)
    _write(srv_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return {"ca_file": ca_path, "ca_key_file": ca_key_path, "cert_file": srv_path, "key_file": srv_key_path}


def issue_client_cert(cert_dir: str, name: str, force: bool = False) -> dict:
    """A client certificate `<name>.pem` signed by the CA (for mTLS with snake.tls_verify)."""
    ca, ca_key = _load_ca(cert_dir)
    path, key_path = os.path.join(cert_dir, f"{name}.pem"), os.path.join(cert_dir, f"{name}-key.pem")
    if os.path.exists(path) and not force:
        raise CertError("already exists; pass --force to replace it", path)
    cert, key = _leaf(ca, ca_key, name, [], server=False)
    _write(key_path, _key_pem(key), private=True)
    _write(path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return {"cert_file": path, "key_file": key_path}
