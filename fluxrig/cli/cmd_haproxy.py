"""`fluxrig haproxy-config`: print the HAProxy configuration for a Rack group (issue 17 item 6).

The configuration fluxrig.balancer.haproxy_config renders (the one tested live in front of three
Racks, and shipped as systemd/haproxy-fluxrig-group.cfg.example): `mode tcp`, `leastconn`, a
health check on each member's balancer health endpoint (`[rack] health_listen`, GET
/health/<group>), redispatch of refused connections, sessions of a member marked down shut.

    fluxrig haproxy-config --group pos --bind 0.0.0.0:8583 \\
        --member pos-1=10.0.0.11:8583,8591 --member pos-2=10.0.0.12:8583,8591 > /etc/haproxy/haproxy.cfg

Exit codes: 0 printed; 2 bad input (a message names the argument).
"""

from __future__ import annotations

import re
import sys

from ..balancer import HaproxyMember, haproxy_config
from ..wire.subjects import RACK_NAME_RE

__all__ = ["register", "run", "parse_member"]

_MEMBER = re.compile(r"^(?P<name>[a-z0-9_-]+)=(?P<host>[^:,\s]+|\[[0-9a-fA-F:.]+\]):(?P<port>\d+),(?P<health>\d+)$")


def parse_member(text: str) -> HaproxyMember:
    """`name=host:port,health_port` -> HaproxyMember; ValueError saying what is wrong."""
    m = _MEMBER.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r}: use NAME=HOST:PORT,HEALTH_PORT (e.g. pos-1=10.0.0.11:8583,8591)")
    port, health = int(m["port"]), int(m["health"])
    if not (0 < port < 65536 and 0 < health < 65536):
        raise ValueError(f"{text!r}: ports must be 1-65535")
    return HaproxyMember(m["name"], m["host"].strip("[]"), port, health)


def register(sub) -> None:
    p = sub.add_parser(
        "haproxy-config",
        help="print the HAProxy configuration spreading a Rack group's inbound connections over its members",
        description=(
            "Print an HAProxy (Debian haproxy 2.6+) configuration for Rack group GROUP: acquirer connections on "
            "--bind spread over the --member Racks (least connections), each checked on its balancer health "
            "endpoint ([rack] health_listen, GET /health/GROUP). Check it with `haproxy -c -f FILE`."
        ),
        epilog="Example: fluxrig haproxy-config --group pos --bind 0.0.0.0:8583 --member pos-1=10.0.0.11:8583,8591",
    )
    p.add_argument("--group", required=True, help="the Rack group (its name in the scenario's racks section)")
    p.add_argument("--bind", required=True, metavar="HOST:PORT", help="where HAProxy accepts connections")
    p.add_argument("--member", action="append", required=True, metavar="NAME=HOST:PORT,HEALTH_PORT",
                   help="a member's service address and health port (repeat per member)")  # fmt: skip
    p.add_argument("--stats-socket", metavar="PATH", help="an admin stats socket for HAProxy (mode 600)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not RACK_NAME_RE.match(args.group or ""):
        print(f"fluxrig haproxy-config: --group {args.group!r}: use a-z, 0-9, _ and -", file=sys.stderr)
        return 2
    host, sep, port = str(args.bind).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"fluxrig haproxy-config: --bind {args.bind!r}: use HOST:PORT (e.g. 0.0.0.0:8583)", file=sys.stderr)
        return 2
    try:
        members = [parse_member(m) for m in args.member]
    except ValueError as exc:
        print(f"fluxrig haproxy-config: --member {exc}", file=sys.stderr)
        return 2
    if len({m.name for m in members}) != len(members):
        print("fluxrig haproxy-config: --member names must be unique", file=sys.stderr)
        return 2
    sys.stdout.write(haproxy_config(args.group, args.bind, members, stats_socket=args.stats_socket))
    return 0
