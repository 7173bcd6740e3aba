"""`conductor`: the switch. Routes ISO 8583 requests to destinations, matches replies, times out.

Ports: `in` (decoded requests from acquirers), `in_reply` (decoded replies from hosts),
`out_<name>` (one per destination named in `routes`), `out_response` (replies back to the
originating connection), `error` (`error.reason`: no_key, no_route, no_destination,
timeout, unmatched_reply).

Correlation key: the MTI *class* (request and response share it: 0200 and 0210 both map to
0200, as jPOS's QMUX does), then DE 11 and DE 41 by default; `correlation.per_mti` overrides the
parts for one request MTI (0800 defaults to the MTI class and DE 11 alone). Parts are field numbers, `mti_class`, or
paths (`meta.x`, `data.y`).

Routing: ordered `routes` with optional prefix matches; a route's `destination` is a port, or
`{failover: [...]}` / `{round_robin: [...]}` of ports or nested trees. A destination port that
ends (through codecs) in a client I/O gear is available only while that gear's link is up
(`conn.up`/`conn.down`); other ports are always available.

Tickets: each routed request parks a ticket with its return context (conn.id and headers) and
a deadline (`ttl`). A retransmission of an open request is absorbed; one of a request answered
within `retain_after_close` is answered again from the retained reply. Expired tickets send the
original request to `error` with `error.reason=timeout`. Drain stops taking requests and waits
for open tickets.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque

from ..conditions import compile_condition
from ..durations import parse_duration
from ..errors import GearError
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..templates import compile_path

DEFAULT_KEY = ["mti_class", 11, 41]
# Network management (echo tests, sign-on) usually carries no terminal id.
DEFAULT_PER_MTI = {"0800": ["mti_class", 11]}
RETURN_META = ("conn.id", "conn.gear", "peer.ip", "peer.port", "flux.source", "iso8583.raw_header")
MAX_TICKETS = 100_000

PART = {"type": ["integer", "string"]}
SCHEMA = {
    "type": "object",
    "properties": {
        "correlation": {
            "type": "object",
            "properties": {
                "key": {"type": "array", "items": PART, "default": DEFAULT_KEY,
                        "description": "key parts: mti_class, field numbers, or meta./data. paths"},
                "per_mti": {"type": "object", "additionalProperties": {"type": "array", "items": PART},
                            "description": "request MTI -> key parts for that MTI"},
            },
            "additionalProperties": False,
            "default": {"key": DEFAULT_KEY},
            "description": "how requests and replies are matched",
        },
        "routes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "match": {"type": "object", "description": "{field: N, prefix|equals|in|...: value}"},
                    "destination": {"type": ["string", "object"], "description": "out_<name> or {failover|round_robin: [...]}"},
                },
                "required": ["destination"],
                "additionalProperties": False,
            },
            "description": "ordered; the first matching route wins; a route without match catches all",
        },
        "ttl": {"type": "string", "format": "duration", "default": "30s", "description": "time a host has to answer"},
        "retain_after_close": {"type": "string", "format": "duration", "default": "5s",
                               "description": "answered requests retransmitted within this get the same reply"},
        "max_tickets": {"type": "integer", "minimum": 1, "default": MAX_TICKETS,
                        "description": "open tickets at most; further requests go to error (no_capacity)"},
    },
    "required": ["routes"],
    "additionalProperties": False,
}


def _leaves(dest) -> list[str]:
    if isinstance(dest, str):
        return [dest]
    if isinstance(dest, dict) and len(dest) == 1:
        (kind, children), = dest.items()
        if kind in ("failover", "round_robin") and isinstance(children, list):
            return [p for c in children for p in _leaves(c)]
    raise ValueError(f"destination {dest!r} is not a port name or {{failover|round_robin: [...]}}")


def _outputs(config: dict) -> list[str]:
    ports = ["out_response"]
    for r in config.get("routes") or []:
        try:
            ports += [p for p in _leaves(r.get("destination")) if p not in ports]
        except ValueError:
            pass
    return ports


def _field_path(part) -> str:
    if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
        return f"data.iso8583.field.{part}"
    return str(part)


def mti_class(mti: str) -> str:
    """Request and response share a class: the function digit rounded down to even."""
    if len(mti) != 4 or not mti.isdigit():
        return mti
    return mti[:2] + str(int(mti[2]) & ~1) + mti[3]


class _Tree:
    """A destination tree: a leaf port, or failover / round-robin over children."""

    def __init__(self, dest):
        if isinstance(dest, str):
            self.kind, self.port, self.children = "leaf", dest, []
        else:
            (self.kind, children), = dest.items()
            self.port = ""
            self.children = [_Tree(c) for c in children]
        self._rr = itertools.count()

    def pick(self, up) -> str | None:
        if self.kind == "leaf":
            return self.port if up(self.port) else None
        n = len(self.children)
        start = next(self._rr) % n if self.kind == "round_robin" else 0
        for i in range(n):
            got = self.children[(start + i) % n].pick(up)
            if got:
                return got
        return None


@register
class ConductorGear(Gear):
    MANIFEST = Manifest(
        "conductor",
        "Switch: routes requests (failover/round robin), matches replies by key, TTL timeouts",
        category="logic",
        inputs=("in", "in_reply"),
        outputs=(),
        schema=SCHEMA,
        dynamic_outputs=_outputs,
    )

    @staticmethod
    def validate_config(config: dict):
        for i, r in enumerate(config.get("routes") or []):
            try:
                for p in _leaves(r.get("destination")):
                    if not p.startswith("out_") or p == "out_response":
                        raise ValueError(f"destination port {p!r} must be out_<name> (not out_response)")
                if r.get("match") is not None:
                    m = r["match"]
                    compile_condition(m, _field_path(m.get("field")))
            except (ValueError, KeyError, TypeError) as exc:
                yield f"routes[{i}]", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        corr = config["correlation"]
        self._key_default = self._key_reader(corr.get("key") or DEFAULT_KEY)
        per_mti = {**DEFAULT_PER_MTI, **(corr.get("per_mti") or {})}
        self._key_per_mti = {mti_class(m): self._key_reader(parts) for m, parts in per_mti.items()}
        self._routes = []
        for r in config["routes"]:
            m = r.get("match")
            cond = compile_condition(m, _field_path(m.get("field"))) if m else None
            self._routes.append((r.get("name") or "", cond, _Tree(r["destination"])))
        self._ttl = parse_duration(config["ttl"])
        self._retain = parse_duration(config["retain_after_close"])
        self._max = config["max_tickets"]
        self.open: dict[tuple, tuple] = {}  # key -> (deadline, request, return meta, port)
        self._deadlines: deque = deque()  # (deadline, key) in arrival order = deadline order (one ttl)
        # key -> (until, reply as CBOR). Bytes, not message objects: thousands of retained replies
        # kept as dicts make every full garbage collection walk them (100+ ms pauses at 5k TPS).
        self.closed: OrderedDict = OrderedDict()
        self._link_up: dict[str, bool] = {}  # port -> link state, for ports bound to an I/O gear
        self._unsubs: list = []
        self._sweeper: asyncio.Task | None = None
        self._draining = False
        self.stats = {"absorbed": 0, "replayed": 0, "timeouts": 0, "unmatched": 0, "matched": 0}

    @staticmethod
    def _key_reader(parts):
        readers = []
        for p in parts:
            if p == "mti_class":
                readers.append(lambda m: mti_class(m.meta.get("iso8583.mti", "")))
            else:
                readers.append(compile_path(_field_path(p)))
        return readers

    def _key(self, msg: FluxMsg) -> tuple:
        readers = self._key_per_mti.get(mti_class(msg.meta.get("iso8583.mti", "")), self._key_default)
        key = tuple(r(msg) for r in readers)
        if any(v is None or v == "" for v in key):
            raise GearError("no_key", "a correlation field is missing")
        return key

    # -- availability -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.outputs:
            if port.startswith("out_") and port != "out_response":
                gear = self.io_binding(port)
                if gear is not None:
                    self._link_up[port] = False
                    self._unsubs.append(self.ctx.control.subscribe(f"link.{gear}", self._on_link(port)))
        self._sweeper = loop.create_task(self._sweep(), name=f"conductor:{self.name}")

    def _on_link(self, port: str):
        def cb(cmd: dict) -> None:
            if cmd.get("cmd") in ("conn.up", "conn.down"):
                self._link_up[port] = cmd["cmd"] == "conn.up"
        return cb

    def _up(self, port: str) -> bool:
        return self._link_up.get(port, True)

    # -- the two inputs ------------------------------------------------------------------------
    async def process(self, port: str, msg: FluxMsg) -> None:
        if port == "in_reply":
            return await self._reply(msg)
        if self._draining:
            raise GearError("draining", "the switch is draining and takes no new requests")
        key = self._key(msg)
        if key in self.open:
            self.stats["absorbed"] += 1
            return
        retained = self.closed.get(key)
        if retained is not None:
            self.stats["replayed"] += 1
            reply = FluxMsg.from_cbor(retained[1])
            for k in RETURN_META:
                if k in msg.meta:
                    reply.meta[k] = msg.meta[k]
            return await self.emit("out_response", reply)
        for name, cond, tree in self._routes:
            if cond is None or cond(msg):
                break
        else:
            raise GearError("no_route", "no route matches this request")
        out = tree.pick(self._up)
        if out is None:
            raise GearError("no_destination", f"route {name or '?'}: no destination is available")
        if len(self.open) >= self._max:
            raise GearError("no_capacity", f"{self._max} requests already open")
        deadline = asyncio.get_running_loop().time() + self._ttl
        back = {k: msg.meta[k] for k in RETURN_META if k in msg.meta}
        self.open[key] = (deadline, msg.copy(), back, out)
        self._deadlines.append((deadline, key))
        msg.meta["conductor.route"] = name
        for k in ("conn.id", "conn.gear", "iso8583.raw_header"):
            msg.meta.pop(k, None)  # the host leg has its own connection and headers
        await self.emit(out, msg)

    async def _reply(self, msg: FluxMsg) -> None:
        try:
            key = self._key(msg)
        except GearError:
            self.stats["unmatched"] += 1
            raise GearError("unmatched_reply", "reply without a correlation key") from None
        ticket = self.open.pop(key, None)
        if ticket is None:
            self.stats["unmatched"] += 1
            raise GearError("unmatched_reply", "no open request matches this reply (late or unknown)")
        self.stats["matched"] += 1
        _deadline, _req, back, _port = ticket
        for k in ("conn.id", "conn.gear", "iso8583.raw_header"):
            msg.meta.pop(k, None)
        msg.meta.update(back)
        if self._retain:
            self.closed[key] = (asyncio.get_running_loop().time() + self._retain, msg.to_cbor())
        await self.emit("out_response", msg)

    # -- time ------------------------------------------------------------------------------------
    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        period = max(0.01, min(self._ttl / 10, 0.25))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            dl = self._deadlines
            while dl and dl[0][0] <= now:
                deadline, key = dl.popleft()
                ticket = self.open.get(key)
                if ticket is None or ticket[0] != deadline:
                    continue  # answered, or a newer ticket under the same key
                del self.open[key]
                self.stats["timeouts"] += 1
                request = ticket[1]
                try:
                    await self.emit_error(request, "timeout", f"no reply within {self._ttl:g}s from {ticket[3]}")
                except Exception as exc:  # an error wire that fails must not stop the sweeper
                    self.log.warning("%s: timeout of %s not delivered: %s", self.name, key, exc)
            closed = self.closed
            while closed:
                k, (until, _r) = next(iter(closed.items()))
                if until > now:
                    break
                closed.popitem(last=False)

    async def drain(self, deadline: float) -> None:
        self._draining = True
        loop = asyncio.get_running_loop()
        while self.open and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for u in self._unsubs:
            u()
        self._unsubs.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.stats)
        m["open_tickets"] = len(self.open)
        m["links_up"] = sum(1 for v in self._link_up.values() if v)
        return m
