"""The Snake's TLS material: a private CA, the server certificate, client certificates.

TLS is on by default (issue 12): the first start of `serve`/`up` calls `ensure_certs`, which
creates what is missing in `<state_dir>/certs` (every file 0600, the directory 0700):

    ca.pem / ca-key.pem          the cluster CA (ECDSA P-256, 10 years)
    server.pem / server-key.pem  the Snake's certificate, signed by the CA, for the given
                                 host names and addresses (always localhost, 127.0.0.1 and
                                 this host's name)
    mixer-client.pem / -key.pem  the Mixer's own bus client certificate (only needed with
                                 `snake.tls_verify = true`: mTLS covers the Mixer's client too)
    <name>.pem / <name>-key.pem  client certificates for Racks under mTLS (`--client NAME`)

Racks learn the CA from their enrollment bundle (its SHA-256 fingerprint is printed by the
Mixer), or `snake.root_ca_file`. Existing files are never overwritten unless `force=True`:
replacing a CA silently would cut every Rack off.

Offline CA (`certs init --offline-ca --ca-key-out PATH`): the CA key is written to PATH (a
removable medium, a vault import) and never left in the state dir; the server certificate and
the Mixer's client certificate are issued before it leaves. The hub then runs with ca.pem,
server.pem and mixer-client.pem only; issuing anything later (a renewed server certificate,
client certificates for Racks) needs the key back: `certs init --force --ca-key PATH`.
Uses `cryptography` only.
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

__all__ = [
    "CertError",
    "init_certs",
    "ensure_certs",
    "issue_client_cert",
    "ensure_server_leaf",
    "ensure_route_leaf",
    "ca_fingerprint",
    "cert_paths",
    "CA_DAYS",
    "LEAF_DAYS",
    "MIXER_CLIENT",
]

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity TLS clients commonly accept for a leaf
MIXER_CLIENT = "mixer-client"  # the Mixer's own bus client certificate (mTLS)


class CertError(FluxError):
    """Certificate files could not be created or read; `path` names the file."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def _write(path: str, data: bytes, private: bool = True) -> None:
    # Certificates are public, but nothing under a state dir is group/other-readable (item 6):
    # 0600 for all, from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def cert_paths(cert_dir: str) -> dict:
    """The standard file names inside `cert_dir`."""
    j = lambda n: os.path.join(cert_dir, n)  # noqa: E731
    return {
        "ca_file": j("ca.pem"),
        "ca_key_file": j("ca-key.pem"),
        "cert_file": j("server.pem"),
        "key_file": j("server-key.pem"),
        "client_cert_file": j(f"{MIXER_CLIENT}.pem"),
        "client_key_file": j(f"{MIXER_CLIENT}-key.pem"),
    }


def ca_fingerprint(ca_pem: bytes | str) -> str:
    """SHA-256 of the CA certificate's DER, lower-case hex (what Racks pin from the bundle)."""
    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate: {exc}") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_ca(cert_dir: str, ca_key_path: str | None = None):
    ca_path, key_path = os.path.join(cert_dir, "ca.pem"), ca_key_path or os.path.join(cert_dir, "ca-key.pem")
    if os.path.exists(ca_path) and not os.path.exists(key_path):
        raise CertError(
            "the CA key is not here (offline CA?): bring it back with --ca-key PATH to issue certificates", key_path
        )
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


def _leaf(ca, ca_key, common_name: str, sans: list, server: bool, route: bool = False):
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
            x509.ExtendedKeyUsage(
                # A cluster route: each end is server to the peers that dial it and client of those it dials.
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if route
                else [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
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


def init_certs(
    cert_dir: str,
    hosts: list[str] | None = None,
    force: bool = False,
    cluster_name: str = "fluxrig",
    *,
    ca_key: str | None = None,
    offline_ca_key_out: str | None = None,
) -> dict:
    """Create the CA (unless present), a server certificate and the Mixer's client certificate.
    `ca_key`: where the CA key is when it is not in `cert_dir` (offline CA). `offline_ca_key_out`:
    write the CA key there and leave none in `cert_dir`. Returns the file paths."""
    os.makedirs(cert_dir, mode=0o700, exist_ok=True)
    os.chmod(cert_dir, 0o700)
    paths = cert_paths(cert_dir)
    ca_path, ca_key_path = paths["ca_file"], paths["ca_key_file"]
    srv_path, srv_key_path = paths["cert_file"], paths["key_file"]
    if os.path.exists(srv_path) and not force:
        raise CertError("already exists; pass --force to issue a new server certificate", srv_path)
    if offline_ca_key_out and os.path.abspath(os.path.dirname(offline_ca_key_out)) == os.path.abspath(cert_dir):
        raise CertError("the offline CA key must leave the state dir; pick a path elsewhere", offline_ca_key_out)
    if os.path.exists(ca_path):
        ca, ca_key_obj = _load_ca(cert_dir, ca_key)  # keep the CA: Racks already trust it
    else:
        ca_key_obj = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} cluster CA")])
        now = _now()
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key_obj.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key_obj, hashes.SHA256())
        )
        if not offline_ca_key_out:
            _write(ca_key_path, _key_pem(ca_key_obj))
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM))
    hosts = list(hosts or []) + [socket.gethostname()]
    cert, key = _leaf(ca, ca_key_obj, "fluxrig-snake", _sans(hosts), server=True)
    _write(srv_key_path, _key_pem(key))
    _write(srv_path, cert.public_bytes(serialization.Encoding.PEM))
    if force or not os.path.exists(paths["client_cert_file"]):
        ccert, ckey = _leaf(ca, ca_key_obj, MIXER_CLIENT, [], server=False)
        _write(paths["client_key_file"], _key_pem(ckey))
        _write(paths["client_cert_file"], ccert.public_bytes(serialization.Encoding.PEM))
    if offline_ca_key_out:
        _write(offline_ca_key_out, _key_pem(ca_key_obj))
        if os.path.exists(ca_key_path):
            os.unlink(ca_key_path)
        paths["ca_key_file"] = offline_ca_key_out
    return paths


def ensure_certs(cert_dir: str, hosts: list[str] | None = None, cluster_name: str = "fluxrig") -> tuple[dict, bool]:
    """(paths, created): what `serve`/`up` need for TLS by default. Creates the CA and the server
    certificate when the server certificate is missing (keeping an existing CA), and the Mixer's
    client certificate when that one is missing and the CA key is at hand. Never replaces a file."""
    paths = cert_paths(cert_dir)
    created = False
    if not os.path.exists(paths["cert_file"]):
        init_certs(cert_dir, hosts, cluster_name=cluster_name)
        created = True
    elif not os.path.exists(paths["client_cert_file"]) and os.path.exists(paths["ca_key_file"]):
        issue_client_cert(cert_dir, MIXER_CLIENT)
    return paths, created


def ensure_server_leaf(cert_dir: str, name: str, hosts: list[str] | None = None) -> dict:
    """`<name>.pem`/`<name>-key.pem`: a server certificate from the cluster CA (the API's HTTPS
    with `api.tls`), created when missing. Returns the paths."""
    path, key_path = os.path.join(cert_dir, f"{name}.pem"), os.path.join(cert_dir, f"{name}-key.pem")
    if not os.path.exists(path):
        ca, ca_key_obj = _load_ca(cert_dir)
        cert, key = _leaf(ca, ca_key_obj, f"fluxrig-{name}", _sans(list(hosts or []) + [socket.gethostname()]), True)
        _write(key_path, _key_pem(key))
        _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return {"cert_file": path, "key_file": key_path}


def ensure_route_leaf(cert_dir: str, hosts: list[str] | None = None) -> dict:
    """`route.pem`/`route-key.pem`: this cluster node's route certificate (issue 14), from the
    cluster CA, for server and client use, created when missing. Returns the paths."""
    path, key_path = os.path.join(cert_dir, "route.pem"), os.path.join(cert_dir, "route-key.pem")
    if not os.path.exists(path):
        ca, ca_key_obj = _load_ca(cert_dir)
        sans = _sans(list(hosts or []) + [socket.gethostname()])
        cert, key = _leaf(ca, ca_key_obj, "fluxrig-route", sans, True, route=True)
        _write(key_path, _key_pem(key))
        _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return {"cert_file": path, "key_file": key_path}


def issue_client_cert(
    cert_dir: str, name: str, force: bool = False, out_dir: str | None = None, ca_key: str | None = None
) -> dict:
    """A client certificate `<name>.pem` signed by the CA (for mTLS with snake.tls_verify),
    written to `out_dir` (default `cert_dir`)."""
    ca, ca_key_obj = _load_ca(cert_dir, ca_key)
    out_dir = out_dir or cert_dir
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    path, key_path = os.path.join(out_dir, f"{name}.pem"), os.path.join(out_dir, f"{name}-key.pem")
    if os.path.exists(path) and not force:
        raise CertError("already exists; pass --force to replace it", path)
    cert, key = _leaf(ca, ca_key_obj, name, [], server=False)
    _write(key_path, _key_pem(key))
    _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return {"cert_file": path, "key_file": key_path}
