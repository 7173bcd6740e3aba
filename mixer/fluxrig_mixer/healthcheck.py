"""`fluxrig-mixer healthcheck`: exit 0 when the running Mixer answers GET /api/v1/health.

Job: the liveness check of images with no shell and no curl (the OCI image's HEALTHCHECK, a
Kubernetes exec probe, a monitoring agent). It reads the same configuration as `serve` and asks
the control API on loopback: api.host 0.0.0.0 / :: (every address) is asked on 127.0.0.1 / ::1,
any other host as written. Standard library only (urllib), so the check costs no import of the
web stack.

Contract:
  * Healthy (exit 0): HTTP 200, a JSON object with "status": "ok", and the Snake running
    (`snake.running`): a Mixer without its bus cannot serve a single Rack, so an orchestrator
    should see it as down (its supervisor restarts the Snake meanwhile; the HEALTHCHECK's
    retries give it that time).
  * Unhealthy (exit 1): no answer within --timeout, refused, an HTTP error, a garbled answer,
    or the Snake down. One line on stderr says which.
  * Bad input (exit 2): configuration error, api.port 0 without --url, bad --timeout.
  * TLS (api.tls_cert_file set): https, and the answer must come from the holder of that very
    certificate: it is the only trust anchor (partial-chain verification, so a CA-issued leaf
    works too) and the host name is not checked, since loopback is not in the certificate.
    The health route needs no token, so no secret is ever sent.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request

from fluxrig.durations import parse_duration
from fluxrig.errors import ConfigError

from .config import DEFAULT_CONFIG_NAME, config_path, load_config

__all__ = ["HEALTH_PATH", "DEFAULT_TIMEOUT", "MAX_ANSWER_BYTES", "register", "run", "health_url", "probe", "Unhealthy"]

HEALTH_PATH = "/api/v1/health"
DEFAULT_TIMEOUT = 3.0
MAX_ANSWER_BYTES = 64 * 1024
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}


class Unhealthy(Exception):
    pass


def health_url(cfg) -> str:
    if not cfg.api.port:
        raise ConfigError("api.port is 0 (a free port picked at start): pass --url", "api.port")
    host = _WILDCARDS.get(cfg.api.host, cfg.api.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if cfg.api.tls_cert_file else "http"
    return f"{scheme}://{host}:{cfg.api.port}{HEALTH_PATH}"


def _pinned_context(cert_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=cert_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot read {cert_file}: {exc}", "api.tls_cert_file") from None
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = False  # loopback is not in the certificate; the pin is the certificate
    return ctx


def probe(url: str, timeout: float, context: ssl.SSLContext | None = None) -> dict:
    """The health answer as a dict, or Unhealthy saying why."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "fluxrig-mixer-healthcheck"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310 (http/https only)
            body = resp.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise Unhealthy(f"{url}: {exc.reason}") from None
    except TimeoutError:
        raise Unhealthy(f"{url}: no answer within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise Unhealthy(f"{url}: {exc}") from None
    if len(body) > MAX_ANSWER_BYTES:
        raise Unhealthy(f"{url}: answer longer than {MAX_ANSWER_BYTES} bytes")
    try:
        answer = json.loads(body)
    except ValueError:
        raise Unhealthy(f"{url}: answer is not JSON: {body[:80]!r}") from None
    if not isinstance(answer, dict):
        raise Unhealthy(f"{url}: answer is not a JSON object")
    if answer.get("status") != "ok":
        raise Unhealthy(f"{url}: status {answer.get('status')!r}")
    if not (answer.get("snake") or {}).get("running"):
        raise Unhealthy(f"{url}: the Snake (nats-server) is not running")
    return answer


def register(sub) -> None:
    h = sub.add_parser(
        "healthcheck",
        help="exit 0 when the running Mixer answers (for container HEALTHCHECK and exec probes)",
        description=(
            f"GET {HEALTH_PATH} of the Mixer running with this configuration (on loopback when api.host is a "
            "wildcard). Exit 0: it answered ok and its Snake runs; 1: no answer or unhealthy; 2: bad input."
        ),
    )
    h.add_argument(
        "-c", "--config", help=f"configuration file (default: $FLUXRIG_MIXER_CONFIG or ./{DEFAULT_CONFIG_NAME})"
    )
    h.add_argument("--url", help=f"ask this URL instead (e.g. http://127.0.0.1:8090{HEALTH_PATH})")
    h.add_argument("--timeout", default=f"{DEFAULT_TIMEOUT:g}s", help="how long to wait for the answer (default 3s)")
    h.add_argument("--json", action="store_true", help="print the Mixer's answer as one JSON object")
    h.set_defaults(func=run)


def run(args) -> int:
    try:
        timeout = parse_duration(str(args.timeout))
    except ValueError as exc:
        raise ConfigError(str(exc), "--timeout") from None
    if timeout <= 0:
        raise ConfigError("must be positive", "--timeout")
    cfg = load_config(config_path(args.config))
    url = args.url or health_url(cfg)
    context = _pinned_context(cfg.api.tls_cert_file) if url.startswith("https:") and cfg.api.tls_cert_file else None
    try:
        answer = probe(url, timeout, context)
    except Unhealthy as exc:
        print(f"fluxrig-mixer healthcheck: unhealthy: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"healthy: {answer.get('name')} {answer.get('version')}, up {answer.get('uptime_s')}s, snake running")
    return 0
