"""The Rack's balancer health endpoint: a tiny HTTP/1.0 responder an L4 load balancer checks.

Job (issue 17 item 6). Members of a Rack group sit behind an L4 balancer (HAProxy: see
`haproxy_config` below and systemd/haproxy-fluxrig-group.cfg.example). The balancer must know,
per member, whether to send it new connections. A TCP connect to the service port only says a
socket listens; this endpoint says whether the Rack takes traffic: its event loop turns, its
graph runs (not starting, stopping or kill-switched), its passport lets it carry traffic, and,
for `/health/<group>`, it is a member of that group right now (a suspended member has left its
groups and answers 503 there while its own gears still run) and its group conductors can share
their requests with the group's saga stream (fluxrig.saga.mirror: cut off from it they decline
every reversible request, so the balancer should send the acquirers to another member).

Contract:
  * `rack.health_listen = "host:port"` (empty = off; port 0 = any free port, see `.port`).
    Plain HTTP on purpose: an HAProxy `option httpchk` speaks nothing else without TLS set-up,
    and the answer carries nothing secret (status words, the Rack's name, scenario version,
    group names, a gear count). Bind it to the balancer's network, not the world.
  * One request per connection: `GET /health` or `GET /health/<group>` (`HEAD` too), at most
    MAX_REQUEST_BYTES of request line and headers, read within REQUEST_TIMEOUT_S; then one
    answer of at most MAX_ANSWER_BYTES and the connection closes. 200 = send traffic, 503 = do
    not (the JSON body says why: `reason`), 404 for another path, 400 for garbage, 405 for
    another method. At most MAX_CONNECTIONS are answered at once; more are closed at once.
  * `parse_request(data)` and `answer(snapshot, path)` are sans-IO (bytes in, bytes out); the
    asyncio server around them is thin. `ready(snapshot, group)` is the rule.
  * `haproxy_config(...)` renders the documented balancer configuration for a group.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_ANSWER_BYTES",
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT_S",
    "TRAFFIC_PASSPORT_STATUSES",
    "BalancerHealth",
    "HaproxyMember",
    "parse_listen",
    "parse_request",
    "ready",
    "answer",
    "haproxy_config",
]

log = logging.getLogger("fluxrig.balancer")

MAX_REQUEST_BYTES = 2048
MAX_ANSWER_BYTES = 1024
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 2.0
#: Passport statuses a member takes traffic in (standalone Racks have none and take it).
TRAFFIC_PASSPORT_STATUSES = ("active", "offline")
_GROUP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def parse_listen(text: str, key: str = "rack.health_listen") -> tuple[str, int] | None:
    """`host:port` -> (host, port); "" -> None; ConfigError naming `key` otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{text!r} is not host:port (e.g. 0.0.0.0:8591; port 0 = any free port)", key)
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_request(data: bytes) -> tuple[int, str, str]:
    """(status, method, path) of a complete request head; status 0 = well formed. Sans-IO."""
    line, _, _rest = data.partition(b"\r\n")
    if b"\n" in line:
        line = line.split(b"\n", 1)[0]
    parts = line.strip().split(b" ")
    if len(parts) not in (2, 3) or not parts[1].startswith(b"/"):
        return 400, "", ""
    try:
        method, path = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return 400, "", ""
    if method not in ("GET", "HEAD"):
        return 405, method, path
    return 0, method, path


def ready(snapshot: dict, group: str | None = None) -> tuple[bool, str]:
    """Whether a balancer should send this Rack new connections, and why not."""
    status = snapshot.get("status")
    if status != "running":
        return False, f"rack is {status}"
    passport = snapshot.get("rack_status")
    if passport is not None and passport not in TRAFFIC_PASSPORT_STATUSES:
        return False, f"rack status is {passport}"
    if group is not None and group not in (snapshot.get("groups") or ()):
        return False, f"not a member of group {group}"
    if group is not None and group in (snapshot.get("unshared_groups") or ()):
        return False, f"group {group}'s saga stream is unreachable: reversible requests are declined here"
    return True, ""


def answer(snapshot: dict, method: str, path: str) -> tuple[int, bytes]:
    """(status, whole HTTP/1.0 response) for `path`; the body is bounded JSON."""
    group = None
    if path.split("?", 1)[0] in ("/health", "/health/"):
        pass
    elif path.startswith("/health/") and 0 < len(path) - 8 <= 64 and set(path[8:]) <= _GROUP_CHARS:
        group = path[8:]
    else:
        return _response(404, {"ok": False, "error": "use GET /health or GET /health/<group>"}, method)
    ok, why = ready(snapshot, group)
    body = {
        "ok": ok,
        "status": snapshot.get("status"),
        "rack": snapshot.get("name"),
        "rack_status": snapshot.get("rack_status"),
        "scenario_version": snapshot.get("scenario_version"),
        "groups": list(snapshot.get("groups") or ())[:16],
        "gears": snapshot.get("gears"),
    }
    if not ok:
        body["reason"] = why
    return _response(200 if ok else 503, body, method)


def _response(status: int, body: dict, method: str = "GET") -> tuple[int, bytes]:
    data = json.dumps(body, separators=(",", ":"), default=str).encode()
    if len(data) > MAX_ANSWER_BYTES - 160:  # headers fit in the rest
        data = json.dumps({"ok": body.get("ok", False), "error": "answer too long"}).encode()
    head = (
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode()
    return status, head + (b"" if method == "HEAD" else data)


class BalancerHealth:
    """The asyncio server around `parse_request`/`answer`. start() never raises for a port
    that cannot be bound: it logs an ERROR and returns False (the Rack's traffic runs on)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict], *, timeout: float = REQUEST_TIMEOUT_S):
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self.timeout = timeout
        self.answered = 0
        self.refused = 0
        self._busy = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> bool:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            log.error("no balancer health endpoint on %s:%d: %s (a balancer will see this Rack as down)",
                      self.host, self.port, exc)  # fmt: skip
            return False
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("balancer health endpoint on http://%s:%d/health", self.host, self.port)
        return True

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy >= MAX_CONNECTIONS:
            self.refused += 1
            writer.transport.abort()
            return
        self._busy += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except asyncio.IncompleteReadError as exc:
                head = exc.partial  # HTTP/0.9-style probes close after the request line
            except asyncio.LimitOverrunError:
                head = b""
            status, method, path = parse_request(head)
            if status:
                _, data = _response(status, {"ok": False, "error": _REASONS[status]})
            else:
                try:
                    _, data = answer(self.snapshot(), method, path)
                except Exception as exc:  # a broken snapshot is a member to avoid, not a crash
                    log.exception("balancer health snapshot failed")
                    _, data = _response(503, {"ok": False, "reason": f"snapshot failed: {type(exc).__name__}"})
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.timeout)
            self.answered += 1
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            self._busy -= 1
            writer.close()


# -- the balancer's configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class HaproxyMember:
    """One member behind the balancer: its service address and its health endpoint's port."""

    name: str
    host: str
    port: int
    health_port: int


def haproxy_config(
    group: str,
    bind: str,
    members: list[HaproxyMember],
    *,
    check_interval_ms: int = 250,
    check_timeout_ms: int = 1000,
    fall: int = 3,
    rise: int = 2,
    connect_timeout_ms: int = 500,
    idle_timeout_s: int = 300,
    maxconn: int = 4096,
    stats_socket: str | None = None,
) -> str:
    """The HAProxy configuration (Debian's haproxy 2.6+) spreading acquirer connections for
    `group` over `members` (see the module docstring and the README's Rack groups section).

    Why each line: `mode tcp` (ISO 8583 and raw TCP links are not HTTP); `balance leastconn`
    (acquirer links are long-lived: round robin by connection count would pile them up on
    the members that were up when they dialled); `option httpchk GET /health/<group>` on each
    member's health port (`check port`), so a member that is killed, suspended, draining or
    wedged stops getting new connections after `fall` failed checks (`inter` apart);
    `option redispatch` + `retries`: a connection to a member that died (refused) is retried
    on another at once, so new connections are served before the checks notice;
    `on-marked-down shutdown-sessions` closes connections still held to a member marked down
    (the acquirer redials through the balancer). `timeout client/server` bound idle links.
    `timeout check` is generous (1 s) on purpose: a busy member answers its check late, and a
    check that gives up sooner marks a working member down and shuts its sessions (seen at
    200 ms on a saturated 2-core box: in-flight transactions lost); new connections do not
    wait for the checks anyway (redispatch).
    """
    lines = [
        "# fluxrig Rack group behind HAProxy (rendered by fluxrig.balancer.haproxy_config)",
        "global",
        f"    maxconn {maxconn}",
    ]
    if stats_socket:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    option dontlognull",
        f"    timeout connect {connect_timeout_ms}ms",
        f"    timeout client {idle_timeout_s}s",
        f"    timeout server {idle_timeout_s}s",
        f"    timeout check {check_timeout_ms}ms",
        "    retries 3",
        "    option redispatch",
        "",
        f"frontend fluxrig-{group}",
        f"    bind {bind}",
        f"    default_backend fluxrig-{group}-members",
        "",
        f"backend fluxrig-{group}-members",
        "    balance leastconn",
        f"    option httpchk GET /health/{group}",
        "    http-check expect status 200",
        f"    default-server inter {check_interval_ms}ms fastinter {check_interval_ms}ms downinter "
        f"{check_interval_ms}ms fall {fall} rise {rise} on-marked-down shutdown-sessions",
    ]
    for m in members:
        lines.append(f"    server {m.name} {m.host}:{m.port} check port {m.health_port}")
    return "\n".join(lines) + "\n"
