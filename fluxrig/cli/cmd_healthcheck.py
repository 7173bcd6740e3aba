"""`fluxrig healthcheck`: exit 0 when the running Rack answers on its health socket.

For places with no shell: the OCI image's HEALTHCHECK, a Kubernetes exec probe
(`command: [/usr/bin/fluxrig, healthcheck]`), a monitoring agent. It asks the Rack that holds
`<base.state_dir>` over `<base.state_dir>/health.sock` (fluxrig/health.py) and needs the same
configuration the Rack runs with (same `-c FILE`, or the same FLUXRIG_* environment, which an
exec probe inherits from the container).

Exit codes: 0 the Rack answered and runs (or is halted by the kill switch, waiting for a revive);
1 no answer, or the Rack is not running yet / stopping; 2 bad input (configuration error, bad
--timeout). One line on stdout says what was seen (`--json` prints the Rack's answer instead).
"""

from __future__ import annotations

import json
import sys

from .. import health
from ..durations import parse_duration
from ..errors import HealthcheckFailed
from .common import config_or_report

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "healthcheck",
        help="exit 0 when the running Rack answers (for container HEALTHCHECK and exec probes)",
        description=(
            "Ask the Rack running with this configuration over <base.state_dir>/health.sock whether it is alive. "
            "Exit 0: it answered and is running (or halted by the kill switch); 1: no answer, starting or "
            "stopping; 2: bad input. Use the Rack's own -c FILE / FLUXRIG_* environment, or --socket."
        ),
    )
    p.add_argument("-c", "--config", metavar="FILE", help="the Rack's fluxrig.toml (default: defaults + FLUXRIG_* env)")
    p.add_argument("--socket", metavar="PATH", help="health socket path (default: <base.state_dir>/health.sock)")
    p.add_argument(
        "--timeout", default=f"{health.DEFAULT_CHECK_TIMEOUT:g}s", help="how long to wait for the answer (default 3s)"
    )
    p.add_argument("--json", action="store_true", help="print the Rack's answer as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        timeout = parse_duration(str(args.timeout))
    except ValueError as exc:
        print(f"fluxrig healthcheck: --timeout: {exc}", file=sys.stderr)
        return 2
    if timeout <= 0:
        print("fluxrig healthcheck: --timeout must be positive", file=sys.stderr)
        return 2
    path = args.socket
    if not path:
        cfg = config_or_report(args.config)
        if cfg is None:
            return 2
        path = health.socket_path(cfg.base.state_dir)
    try:
        answer = health.check(path, timeout)
    except HealthcheckFailed as exc:
        print(f"fluxrig healthcheck: unhealthy: {exc}", file=sys.stderr)
        return 1
    ok = health.healthy(answer)
    if args.json:
        print(json.dumps(answer))
    elif ok:
        print(
            f"healthy: {answer.get('status')} scenario {answer.get('scenario')} "
            f"version {answer.get('scenario_version')}, {answer.get('gears')} gears, up {answer.get('uptime_s')}s"
        )
    if not ok:
        reason = answer.get("error") or f"status {answer.get('status')!r}"
        print(f"fluxrig healthcheck: unhealthy: {reason}", file=sys.stderr)
    return 0 if ok else 1
