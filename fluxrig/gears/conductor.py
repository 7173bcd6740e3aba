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

Reversals (a route's `reversal` section; see fluxrig.saga): a reversible request (0100/0200 by
default) whose reply does not come before the deadline, whose late reply approves, or whose leg
drops after it was written, makes the switch owe a reversal (0400 or 0420, DE 90 original data
elements, a reason code, a new STAN). The owed reversal is fsync'd in the gear's saga journal
(`saf.dir`, default `<state_dir>/saga/<gear>`) BEFORE the acquirer hears the decline; it is sent
store-and-forward per destination leg (window, exponential back-off, repeat MTI 0401/0421,
parked after `saf.max_attempts` refusals or `saf.expire_after`). A lost leg declines its open
requests at once with `error.reason=link_lost`. Card numbers are sealed at rest with the key in
`saf.key_file` (default `<state_dir>/saga.key`; fluxrig/saga/seal.py); new STANs come from
`saf.stan_range` (fluxrig/saga/stan.py: disjoint ranges per Rack of a group).

In a Rack group (`saf.group`, the group the gear is deployed to), owed reversals outlive their
Rack: each member mirrors its sagas to the group's stream, and a member silent for a lease
(15 s) has its open reversals claimed by a survivor, resumed at their attempt counts on the
survivor's leg of the same name, else on the route's failover choice (fluxrig/saga/mirror.py).
The members must share `saf.key_file` (a survivor must open the card numbers it sends). An
owed reversal is declined to the acquirer once it is also in the stream, or after
`saf.mirror_wait` (a member whose bus is down owes alone; its own restart resumes those).
With `saf.share_tickets` (default) requests in flight are shared too: a request is sent, and
an approval delivered, only once the group's stream holds its ticket (within
`saf.mirror_wait`; else it is declined, and an approval reversed from here), so a survivor
reverses what a dead member had sent and nothing it had answered. The cost: two stream
acknowledgements per reversible transaction.

A reversal from the acquirer (an 0400/0420 on `in` with DE 90) goes to the leg that carried its
original. If the original is still open, the acquirer's reversal wins: the original's ticket is
closed, its reply (if any) is dropped and counted (`superseded`), and the switch owes no
reversal of its own for it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import OrderedDict, deque

from ..conditions import compile_condition
from ..durations import parse_duration
from ..errors import ConfigError, GearError
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..runtime.states import GearState
from ..saga.mirror import JsSafBus, MirrorUnavailable, SagaMirror
from ..saga.orchestrator import DEFAULT_MAX_OWED, DEFAULT_REFUSAL_CODES, OwedReversal, Reversals, SagaSettings
from ..saga.reversal import CAUSES, DEFAULT_COPY_FIELDS, ReversalPolicy, is_reversal_class
from ..saga.saf import DEFAULT_BACKOFF_CAP_S, DEFAULT_BACKOFF_INITIAL_S, DEFAULT_MAX_ATTEMPTS, DEFAULT_WINDOW
from ..saga.seal import KEY_FILE
from ..saga.stan import STAN_MAX, check_range
from ..saga.store import SagaStore
from ..templates import compile_path
from ..wal import WalFull
from ..wire import meta as M
from ..wire import subjects as S
from ..wire.messages import LinkEvent

__all__ = ["mti_class", "ConductorGear"]

DEFAULT_KEY = ["mti_class", 11, 41]
# Network management (echo tests, sign-on) usually carries no terminal id.
DEFAULT_PER_MTI = {"0800": ["mti_class", 11]}
RETURN_META = M.RETURN_KEYS
MAX_TICKETS = 100_000
MIRROR_START_WAIT_S = 5.0  # at start, how long the group's saga mirror may take to be read
MAX_REMEMBERED = 100_000  # timed-out tickets kept for a late approval, and legs of recent originals

REVERSAL_SCHEMA = {
    "type": "object",
    "properties": {
        "enabled": {"type": "boolean", "default": True},
        "mti": {"type": "string", "enum": ["0400", "0420"], "default": "0400", "description": "reversal or advice"},
        "when": {
            "type": "array",
            "items": {"type": "string", "enum": list(CAUSES)},
            "default": list(CAUSES),
            "description": "when a reversal is owed: timeout, late_approval, link_lost",
        },
        "reason_field": {"type": "integer", "default": 39, "description": "field carrying the reason code"},
        "reason_codes": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "cause -> code (defaults: timeout 68, late_approval 68, link_lost 91)",
        },
        "copy_fields": {
            "type": "array",
            "items": {"type": "integer", "minimum": 2, "maximum": 192},
            "default": list(DEFAULT_COPY_FIELDS),
            "description": "original fields copied (track data and PIN blocks never are)",
        },
        "mtis": {
            "type": "array",
            "items": {"type": "string"},
            "default": ["0100", "0200"],
            "description": "request MTI classes that are reversed",
        },
        "approved_codes": {
            "type": "array",
            "items": {"type": "string"},
            "default": ["00", "08", "10", "11"],
            "description": "DE 39 codes of a late reply that make a reversal owed",
        },
    },
    "additionalProperties": False,
}

SAF_SCHEMA = {
    "type": "object",
    "properties": {
        "group": {
            "type": "string",
            "default": "",
            "description": "the Rack group whose members take over each other's owed reversals (the gear's deploy)",
        },
        "share_tickets": {
            "type": "boolean",
            "default": True,
            "description": "with saf.group: share requests in flight too, so a survivor reverses what a dead member had sent "
            "(each request and approval waits for the group's stream; without it the member declines)",
        },
        "mirror_wait": {
            "type": "string",
            "format": "duration",
            "default": "500ms",
            "description": "how long an owed reversal waits for the group's stream before the acquirer hears the decline",
        },
        "dir": {
            "type": "string",
            "default": "",
            "description": "saga journal directory (default <state_dir>/saga/<gear>)",
        },
        "window": {
            "type": "integer",
            "minimum": 1,
            "default": DEFAULT_WINDOW,
            "description": "reversals in flight per leg",
        },
        "backoff_initial": {"type": "string", "format": "duration", "default": f"{DEFAULT_BACKOFF_INITIAL_S:g}s"},
        "backoff_cap": {"type": "string", "format": "duration", "default": f"{DEFAULT_BACKOFF_CAP_S:g}s"},
        "max_attempts": {
            "type": "integer",
            "minimum": 1,
            "default": DEFAULT_MAX_ATTEMPTS,
            "description": "refused answers before a reversal is parked",
        },
        "expire_after": {
            "type": "string",
            "format": "duration",
            "default": "24h",
            "description": "run time before parking",
        },
        "max_owed": {
            "type": "integer",
            "minimum": 1,
            "default": DEFAULT_MAX_OWED,
            "description": "open reversals at most",
        },
        "refusal_codes": {
            "type": "array",
            "items": {"type": "string"},
            "default": list(DEFAULT_REFUSAL_CODES),
            "description": "answer codes that do not end a reversal (format error ...)",
        },
        "stan_range": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": STAN_MAX},
            "minItems": 2,
            "maxItems": 2,
            "default": [1, STAN_MAX],
            "description": "[first, last] STAN (DE 11) this conductor originates for reversals; give the "
            "members of a Rack group disjoint ranges so their STANs and RRNs never collide",
        },
        "key_file": {
            "type": "string",
            "default": "",
            "description": "key sealing card numbers in the saga journal (default <state_dir>/saga.key, "
            "created on first use, mode 0600)",
        },
    },
    "additionalProperties": False,
    "default": {},
}

PART = {"type": ["integer", "string"]}
SCHEMA = {
    "type": "object",
    "properties": {
        "correlation": {
            "type": "object",
            "properties": {
                "key": {
                    "type": "array",
                    "items": PART,
                    "default": DEFAULT_KEY,
                    "description": "key parts: mti_class, field numbers, or meta./data. paths",
                },
                "per_mti": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": PART},
                    "description": "request MTI -> key parts for that MTI",
                },
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
                    "destination": {
                        "type": ["string", "object"],
                        "description": "out_<name> or {failover|round_robin: [...]}",
                    },
                    "reversal": REVERSAL_SCHEMA,
                },
                "required": ["destination"],
                "additionalProperties": False,
            },
            "description": "ordered; the first matching route wins; a route without match catches all",
        },
        "ttl": {"type": "string", "format": "duration", "default": "30s", "description": "time a host has to answer"},
        "retain_after_close": {
            "type": "string",
            "format": "duration",
            "default": "5s",
            "description": "answered requests retransmitted within this get the same reply",
        },
        "max_tickets": {
            "type": "integer",
            "minimum": 1,
            "default": MAX_TICKETS,
            "description": "open tickets at most; further requests go to error (no_capacity)",
        },
        "saf": SAF_SCHEMA,
    },
    "required": ["routes"],
    "additionalProperties": False,
}


def _leaves(dest) -> list[str]:
    if isinstance(dest, str):
        return [dest]
    if isinstance(dest, dict) and len(dest) == 1:
        ((kind, children),) = dest.items()
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
            ((self.kind, children),) = dest.items()
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
            try:
                ReversalPolicy.from_config(r.get("reversal"))
            except ConfigError as exc:
                yield f"routes[{i}].{exc.key or 'reversal'}", str(exc)
        try:
            check_range((config.get("saf") or {}).get("stan_range"))
        except ConfigError as exc:
            yield exc.key or "saf.stan_range", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        corr = config["correlation"]
        self._key_default = self._key_reader(corr.get("key") or DEFAULT_KEY)
        per_mti = {**DEFAULT_PER_MTI, **(corr.get("per_mti") or {})}
        self._key_per_mti = {mti_class(m): self._key_reader(parts) for m, parts in per_mti.items()}
        self._routes = []
        self._policies: dict[str, ReversalPolicy] = {}
        self._trees: dict[str, _Tree] = {}
        for i, r in enumerate(config["routes"]):
            m = r.get("match")
            cond = compile_condition(m, _field_path(m.get("field"))) if m else None
            name = r.get("name") or f"route{i}"
            tree = _Tree(r["destination"])
            self._routes.append((name, cond, tree))
            self._trees[name] = tree
            policy = ReversalPolicy.from_config(r.get("reversal"))
            if policy is not None:
                self._policies[name] = policy
        saf = config.get("saf") or {}
        self._saf_settings = SagaSettings(
            window=saf.get("window", DEFAULT_WINDOW),
            backoff_initial=parse_duration(saf.get("backoff_initial", f"{DEFAULT_BACKOFF_INITIAL_S:g}s")),
            backoff_cap=parse_duration(saf.get("backoff_cap", f"{DEFAULT_BACKOFF_CAP_S:g}s")),
            max_attempts=saf.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
            expire_after=parse_duration(saf.get("expire_after", "24h")),
            max_owed=saf.get("max_owed", DEFAULT_MAX_OWED),
            refusal_codes=saf.get("refusal_codes", DEFAULT_REFUSAL_CODES),
            stan_range=check_range(saf.get("stan_range")),
        )
        self._saf_key_file = saf.get("key_file") or ""
        self._saf_group = saf.get("group") or ""
        self._mirror_wait = parse_duration(saf.get("mirror_wait", "500ms"))
        self._share_tickets = bool(saf.get("share_tickets", True))
        self.mirror: SagaMirror | None = None
        self._saf_dir = saf.get("dir") or ""
        self.reversals: Reversals | None = None
        # Timed-out tickets (key -> route, request, leg, owed) for a late approval, and the legs
        # of recent originals (key -> leg) for a reversal from the acquirer. Both bounded.
        self._timed_out: OrderedDict = OrderedDict()
        self._legs: OrderedDict = OrderedDict()
        self._superseded: set = set()  # keys of open originals an acquirer reversal replaced
        self._tasks: set = set()  # journal waits running beside the inputs
        self._serial: dict[str, deque] = {}  # port -> journaled jobs in order (_serially)
        self._serial_busy: set[str] = set()  # ports whose queue has a task running it
        self._take_from: ConductorGear | None = None  # reload: the version we take over from
        self._successor: ConductorGear | None = None  # reload: who took our tickets
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
        self.stats = {
            "absorbed": 0, "replayed": 0, "timeouts": 0, "unmatched": 0, "matched": 0,
            "link_lost": 0, "superseded": 0, "acquirer_reversals": 0, "never_sent": 0, "unshared": 0,
        }  # fmt: skip

    @staticmethod
    def _key_reader(parts):
        readers = []
        for p in parts:
            if p == "mti_class":
                readers.append(lambda m: mti_class(m.meta.get(M.ISO_MTI, "")))
            else:
                readers.append(compile_path(_field_path(p)))
        return readers

    def _key(self, msg: FluxMsg) -> tuple:
        readers = self._key_per_mti.get(mti_class(msg.meta.get(M.ISO_MTI, "")), self._key_default)
        key = tuple(r(msg) for r in readers)
        if any(v is None or v == "" for v in key):
            raise GearError("no_key", "a correlation field is missing")
        return key

    # -- availability -------------------------------------------------------------------------
    def _saga_dir(self) -> str:
        if self._saf_dir:
            return (
                os.path.join(self.ctx.scenario_dir, self._saf_dir)
                if not os.path.isabs(self._saf_dir)
                else self._saf_dir
            )
        base = self.ctx.state_dir
        if not base:
            raise GearError(
                "no_state_dir", f"conductor {self.name}: reversals need a saga journal: set saf.dir or run in a Rack"
            )
        return os.path.join(base, "saga", self.name)

    def _key_file(self) -> str:
        """Where the key sealing PANs at rest is: saf.key_file, else the Rack's state dir, else
        beside the journal (a conductor run outside a Rack with saf.dir only)."""
        if self._saf_key_file:
            path = self._saf_key_file
            return path if os.path.isabs(path) else os.path.join(self.ctx.scenario_dir, path)
        if self.ctx.state_dir:
            return os.path.join(self.ctx.state_dir, KEY_FILE)
        return ""

    def handover_from(self, old: Gear) -> None:
        # The journal is one WAL (one writer): a rebuilt conductor keeps the running one's
        # sagas instead of opening it a second time; open tickets and retained replies too.
        # Taken at start(), not now: until then the old one still matches replies (issue 18).
        if isinstance(old, ConductorGear):
            self._take_from = old

    def _take_over(self, old: ConductorGear) -> None:
        """Move the running conductor's sagas and tickets here (start). From then on it hands
        whatever still reaches it (in flight in the graph it came from) to us; a rolled-back
        swap gives everything back (stop)."""
        if old.reversals is not None and self._policies:
            self.reversals, old.reversals = old.reversals, None
            self.mirror, old.mirror = old.mirror, None  # the journal's mirror goes with it
            if self.mirror is not None:  # a claim adopts with this version's routes and settings
                self.mirror.rebind(self._adopt, self._share_tickets, self._mirror_wait)
            self.reversals.rebind(self._saf_settings, self.emit, self._up, self._pick_for, self._reply_key)
        if old.config.get("correlation") == self.config.get("correlation"):
            self.open, self._deadlines, self.closed = old.open, old._deadlines, old.closed
            self._timed_out, self._legs, self._superseded = old._timed_out, old._legs, old._superseded
            old.open, old._deadlines, old.closed = {}, deque(), OrderedDict()
        old._successor = self

    def _give_back(self, old: ConductorGear) -> None:
        if self.reversals is not None and old.reversals is None and old._policies:
            old.reversals, self.reversals = self.reversals, None
            old.mirror, self.mirror = self.mirror, None
            if old.mirror is not None:
                old.mirror.rebind(old._adopt, old._share_tickets, old._mirror_wait)
            old.reversals.rebind(old._saf_settings, old.emit, old._up, old._pick_for, old._reply_key)
        if old.open is not self.open and not old.open:
            old.open, old._deadlines, old.closed = self.open, self._deadlines, self.closed
            old._timed_out, old._legs, old._superseded = self._timed_out, self._legs, self._superseded
        old._successor = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._take_from is not None:
            self._take_over(self._take_from)
            if self.mirror is not None and self.mirror.group != self._saf_group:
                # saf.group changed or went: this journal stops sharing with the old group
                mirror, self.mirror = self.mirror, None
                self.reversals.store.mirror = None
                await mirror.stop()
        for port in self.outputs:
            if port.startswith("out_") and port != "out_response":
                gear = self.io_binding(port)
                if gear is not None:
                    self._link_up[port] = False
                    self._unsubs.append(self.ctx.control.subscribe(M.link_topic(gear), self._on_link(port)))
        if self._policies and self.reversals is None:
            store = await SagaStore.open(self._saga_dir(), self._key_file())
            self.reversals = Reversals(
                self.name, store, self._saf_settings, self.emit, self._up, self._pick_for, self._reply_key
            )
        if self.reversals is not None and self._saf_group and self.mirror is None:
            await self._start_mirror(self.reversals.store)
        if self.reversals is not None:
            await self._owe_recovered()
            self.reversals.start()
        self._sweeper = loop.create_task(self._sweep(), name=f"conductor:{self.name}")

    async def _start_mirror(self, store: SagaStore) -> None:
        """Share the sagas with the group (issue 17 item 4) before any is sent: a survivor may
        have adopted some while this Rack was away (they are handed over first)."""
        session = getattr(self.ctx.bus, "session", None)
        if session is None or not hasattr(session, "jetstream"):
            raise GearError("no_bus", f"{self.name}: saf.group needs a Rack joined to a Mixer (snake.url)")
        rev = self.reversals
        self.mirror = SagaMirror(
            JsSafBus(session.jetstream, S.saf_stream(self._saf_group)), self._saf_group, self.name,
            self.ctx.rack_name, store.seal, self._adopt, rev.hand_over, rev.open_state, owe_wait=self._mirror_wait,
            share_tickets=self._share_tickets,
        )  # fmt: skip
        store.mirror = self.mirror
        self.mirror.start()
        if not await self.mirror.reconciled(MIRROR_START_WAIT_S):
            self.log.warning("%s: the group's saga mirror is not reachable yet: owed reversals are sent from "
                             "here meanwhile (one another member adopted may be repeated)", self.name)  # fmt: skip

    def _owed_for_tickets(self, tickets: dict[int, dict], ours: bool) -> list[OwedReversal]:
        """Reversals for requests journaled `open` and never answered: ours (recovered from
        this journal: each owe names its ticket) or a dead member's (adopted: no ticket here)."""
        owed = []
        for seq, ev in tickets.items():
            policy = self._policies.get(ev.get("route", ""))
            if policy is None:
                policy = next(iter(self._policies.values()))
            request = FluxMsg(
                meta={M.ISO_MTI: ev.get("mti", "")}, data={"iso8583": {"field": dict(ev.get("fields") or {})}}
            )
            request.trace = ev.get("trace", "")
            owed.append(OwedReversal(ev.get("route", ""), policy, request, ev.get("leg", ""), "timeout",
                                     seq if ours else None))  # fmt: skip
        return owed

    async def _owe_recovered(self) -> None:
        """Requests the previous run wrote to an issuer and never saw answered: reversed now
        (their replies, if any, went to a connection that no longer exists)."""
        owed = self._owed_for_tickets(self.reversals.recovered_tickets(), ours=True)
        if owed:
            self.log.warning(
                "%s: %d requests were in flight when the Rack stopped: reversing them", self.name, len(owed)
            )
            await self.reversals.owe(owed)

    async def _adopt(self, sagas: dict, tickets: dict[int, dict], owner: str) -> int:
        """A silent member's sagas and requests in flight, claimed by this member's mirror: its
        sagas resumed here, its requests reversed from here (their replies went to its legs)."""
        rev = self.reversals
        if rev is None:
            return 0
        taken = await rev.adopt(sagas, owner)
        owed = self._owed_for_tickets(tickets, ours=False)
        if owed:
            self.log.warning("%s: %d requests member %s had written to an issuer: reversing them", self.name,
                             len(owed), owner)  # fmt: skip
            taken += len(await rev.owe(owed))
        return taken

    def _on_link(self, port: str):
        def cb(cmd: dict) -> None:
            event = LinkEvent.from_dict(cmd)
            if event is not None:
                was = self._link_up.get(port)
                self._link_up[port] = event.up
                if was and not event.up:
                    asyncio.get_running_loop().create_task(self._link_lost(port))

        return cb

    def _up(self, port: str) -> bool:
        return self._link_up.get(port, True)

    def _pick_for(self, route: str, _leg: str) -> str | None:
        tree = self._trees.get(route)
        return tree.pick(self._up) if tree is not None else None

    def _reply_key(self, mti: str, fields: dict) -> tuple:
        probe = FluxMsg(meta={M.ISO_MTI: mti}, data={"iso8583": {"field": fields}})
        try:
            return self._key(probe)
        except GearError:
            return ("saga", mti_class(mti), fields.get("11"))

    # -- the two inputs ------------------------------------------------------------------------
    async def process(self, port: str, msg: FluxMsg) -> None:
        if self._successor is not None:  # retired by a reload: the successor holds the tickets
            return await self._successor.process(port, msg)
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
        for name, cond, tree in self._routes:  # noqa: B007 (used after the loop)
            if cond is None or cond(msg):
                break
        else:
            raise GearError("no_route", "no route matches this request")
        out = self._acquirer_reversal_leg(msg) if is_reversal_class(msg.meta.get(M.ISO_MTI, "")) else None
        if out is None:
            out = tree.pick(self._up)
        if out is None:
            raise GearError("no_destination", f"route {name or '?'}: no destination is available")
        if len(self.open) >= self._max:
            raise GearError("no_capacity", f"{self._max} requests already open")
        deadline = asyncio.get_running_loop().time() + self._ttl
        back = {k: msg.meta[k] for k in RETURN_META if k in msg.meta}
        journal = [None]  # seq of the request's `open` event once journaled
        ticket = (deadline, msg.copy(), back, out, name, journal)
        self.open[key] = ticket
        self._deadlines.append((deadline, key))
        policy = self._policies.get(name)
        if policy is not None:
            self._remember(self._legs, key, out)
        msg.meta[M.CONDUCTOR_ROUTE] = name
        for k in (M.CONN_ID, M.CONN_GEAR, M.ISO_RAW_HEADER):
            msg.meta.pop(k, None)  # the host leg has its own connection and headers
        if (
            policy is not None
            and self.reversals is not None
            and policy.owes(mti_class(ticket[1].meta.get(M.ISO_MTI, "")), "timeout")
        ):
            # Journaled before it is written: a crash from here on leaves a ticket the restarted
            # switch reverses, never an approval nobody knows about. The wait for the fsync runs
            # beside the connection's next requests (they share its group commit), not before them.
            # No task or future per request: the journal's group commit calls _ticket_durable,
            # which queues the send on its leg's serial queue (_serially).
            self.reversals.stage_ticket_then(
                name, out, msg, policy.journal_fields, self._ticket_durable, (key, ticket, out, msg, self.reversals)
            )
            return
        await self.emit(out, msg)

    def _later(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _serially(self, port: str, job, *args) -> None:
        """Run `job(*args)` after the jobs queued before it on `port`, in one task per port that
        lives while the queue has work: a journal group commit's sends or replies cost one task,
        not one per request, and keep their order on the port (a slow leg delays only itself)."""
        q = self._serial.get(port)
        if q is None:
            q = self._serial[port] = deque()
        q.append((job, args))
        if port not in self._serial_busy:
            self._serial_busy.add(port)
            self._later(self._run_serially(port, q))

    async def _run_serially(self, port: str, q: deque) -> None:
        try:
            while q:
                job, args = q.popleft()
                try:
                    await job(*args)
                except Exception:  # noqa: BLE001 (one request's failure must not stop the port's queue)
                    self.log.exception("%s: journaled request on %s not handled", self.name, port)
        finally:
            self._serial_busy.discard(port)

    def _ticket_durable(self, job: tuple, seq: int | None, exc: BaseException | None) -> None:
        if exc is None:
            self._serially(job[2], self._send_journaled, *job, seq, exc)
        else:  # declined beside the others (each waits on the journal): never behind the leg's queue
            self._later(self._send_journaled(*job, seq, exc))

    async def _send_journaled(self, key, ticket, out: str, msg: FluxMsg, reversals, seq, exc) -> None:
        # `reversals` bound when the request was staged: a reload may hand self.reversals on meanwhile
        journal = ticket[5]
        if exc is None:
            journal[0] = seq
        elif isinstance(exc, MirrorUnavailable):  # on disk, not in the group's stream: not sent, declined
            if self.open.get(key) is ticket:
                del self.open[key]
            self.stats["unshared"] += 1
            await reversals.close_ticket(exc.seq, strict=False)
            await self.emit_error(ticket[1], "no_destination", str(exc))
            return
        else:  # not journaled: not sent; the acquirer is declined
            if self.open.get(key) is ticket:
                del self.open[key]
            self.log.error("%s: request not journaled, not sent: %s", self.name, exc)
            await self.emit_error(ticket[1], "journal_failed", str(exc))
            return
        if self.open.get(key) is not ticket and (
            self._successor is None or self._successor.open.get(key) is not ticket
        ):
            # Timed out meanwhile: never sent. Closed beside the queue: the leg's next sends go on.
            self._later(reversals.close_ticket(journal[0], strict=False))
            return
        try:
            await self.emit(out, msg)
        except Exception as exc:  # noqa: BLE001 (the ticket stays: its timeout owes the reversal)
            self.log.warning("%s: request to %s not delivered: %s", self.name, out, exc)

    @staticmethod
    def _remember(store: OrderedDict, key, value) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > MAX_REMEMBERED:
            store.popitem(last=False)

    def _acquirer_reversal_leg(self, msg: FluxMsg) -> str | None:
        """A reversal from the acquirer: the leg its original went to (None: route normally).
        An original still open is superseded: see the module docstring."""
        fields = (msg.data.get("iso8583") or {}).get("field") or {}
        de90 = str(fields.get("90") or "")
        if len(de90) < 10 or not de90[:10].isdigit():
            return None
        self.stats["acquirer_reversals"] += 1
        original = {"11": de90[4:10], "41": fields.get("41"), "32": fields.get("32"), "42": fields.get("42")}
        okey = self._reply_key(de90[:4], {k: v for k, v in original.items() if v is not None})
        ticket = self.open.get(okey)
        if ticket is not None:
            self._superseded.add(okey)
            leg = ticket[3]
        else:
            leg = self._legs.get(okey)
        if leg is not None and self._up(leg):
            return leg
        return None

    async def _reply(self, msg: FluxMsg) -> None:
        if self.reversals is not None and self.reversals.on_reply(msg):
            return
        try:
            key = self._key(msg)
        except GearError:
            self.stats["unmatched"] += 1
            raise GearError("unmatched_reply", "reply without a correlation key") from None
        ticket = self.open.pop(key, None)
        if ticket is None:
            self.stats["unmatched"] += 1
            await self._late_reply(key, msg)
            raise GearError("unmatched_reply", "no open request matches this reply (late or unknown)")
        journal = ticket[5]
        if journal[0] is not None:
            # Closed on disk before the acquirer hears it; the wait runs beside the leg's next
            # replies, and the group commit's callback queues the delivery (_reply_closed).
            job = (key, ticket, msg, self.reversals)
            try:
                self.reversals.close_ticket_then(journal[0], self._reply_closed, job)
            except WalFull:
                self._later(self._reply_when_closed(*job))  # waits for room in the journal
            except Exception as exc:  # noqa: BLE001 (WalFailed ...: handled like a failed close)
                self._reply_closed(job, exc)
            return
        await self._deliver_reply(key, ticket, msg)

    def _reply_closed(self, job: tuple, exc: BaseException | None) -> None:
        if exc is None:
            self._serially("out_response", self._reply_after_close, *job, exc)
        else:  # a decline owes a reversal first (a journal wait): beside the others, not in line
            self._later(self._reply_after_close(*job, exc))

    async def _reply_when_closed(self, key, ticket, msg: FluxMsg, reversals) -> None:
        try:
            await reversals.close_ticket(ticket[5][0])
        except Exception as exc:  # noqa: BLE001 (the journal's and the mirror's: as the callback gets them)
            return await self._reply_after_close(key, ticket, msg, reversals, exc)
        await self._reply_after_close(key, ticket, msg, reversals, None)

    async def _reply_after_close(self, key, ticket, msg: FluxMsg, reversals, exc) -> None:
        # `reversals` bound when the reply came: a reload may hand self.reversals on meanwhile
        if exc is None:
            await self._deliver_reply(key, ticket, msg)
        elif isinstance(exc, MirrorUnavailable):
            # Closed on disk, but a survivor reading the group's stream would still see it open
            # and reverse it: so it is not delivered; it is declined and reversed from here.
            self.stats["unshared"] += 1
            why = f"reply not shared with the group: {exc}"
            self.log.warning("%s: %s (declined, reversal owed)", self.name, why)
            await self._decline([(key, ticket)], "timeout", lambda _t: why)
        else:  # not closed: not answered; a restart reverses it
            self.log.error("%s: reply not journaled, held back (the request will be reversed): %s", self.name, exc)

    async def _deliver_reply(self, key, ticket, msg: FluxMsg) -> None:
        if key in self._superseded:
            self._superseded.discard(key)
            self.stats["superseded"] += 1
            self.log.info("%s: reply %s dropped: the acquirer reversed its request", self.name, msg.meta.get(M.ISO_MTI))
            return
        self.stats["matched"] += 1
        _deadline, _req, back, _port, _route, _journal = ticket
        for k in (M.CONN_ID, M.CONN_GEAR, M.ISO_RAW_HEADER):
            msg.meta.pop(k, None)
        msg.meta.update(back)
        if self._retain:
            self.closed[key] = (asyncio.get_running_loop().time() + self._retain, msg.to_cbor())
        await self.emit("out_response", msg)

    async def _late_reply(self, key, msg: FluxMsg) -> None:
        """A reply after the deadline: an approval owes a reversal unless one is owed already."""
        late = self._timed_out.pop(key, None)
        if late is None or self.reversals is None:
            return
        route, request, leg, owed = late
        policy = self._policies.get(route)
        code = ((msg.data.get("iso8583") or {}).get("field") or {}).get("39")
        if owed or policy is None or not policy.approves(code):
            return
        if policy.owes(mti_class(request.meta.get(M.ISO_MTI, "")), "late_approval"):
            await self.reversals.owe([OwedReversal(route, policy, request, leg, "late_approval")])

    def _owed_for(self, key, ticket, cause: str) -> OwedReversal | None:
        _deadline, request, _back, port, route, journal = ticket
        if key in self._superseded:
            self._superseded.discard(key)
            return None  # the acquirer's own reversal covers it
        policy = self._policies.get(route)
        if policy is None or self.reversals is None:
            return None
        if not policy.owes(mti_class(request.meta.get(M.ISO_MTI, "")), cause):
            return None
        if journal[0] is None:
            # Its `open` is not on disk yet, so it was never written to the issuer, and it never
            # will be (_send_journaled drops a ticket that is no longer open): nothing to undo.
            self.stats["never_sent"] += 1
            return None
        return OwedReversal(route, policy, request, port, cause, journal[0])

    async def _decline(self, tickets: list, cause: str, detail) -> None:
        """Owe what is owed (durably), then tell the acquirers: never the other way round."""
        owed = [o for key, t in tickets if (o := self._owed_for(key, t, cause)) is not None]
        if owed:
            await self.reversals.owe(owed)
        owed_ids = {id(o.request) for o in owed}
        for key, ticket in tickets:
            _deadline, request, _back, port, route, journal = ticket
            if journal[0] is not None and id(request) not in owed_ids:
                await self.reversals.close_ticket(journal[0], strict=False)  # superseded: nothing owed for it
            if route in self._policies:
                self._remember(self._timed_out, key, (route, request, port, id(request) in owed_ids))
            try:
                await self.emit_error(request, cause, detail(ticket))
            except Exception as exc:  # an error wire that fails must not stop the sweeper
                self.log.warning("%s: %s of %s not delivered: %s", self.name, cause, key, exc)

    async def _link_lost(self, port: str) -> None:
        if not any(name in self._policies for name, _c, _t in self._routes):
            return  # without reversals a lost leg's requests time out as they always did
        lost = [(k, t) for k, t in self.open.items() if t[3] == port and t[4] in self._policies]
        for k, _t in lost:
            del self.open[k]
        if lost:
            self.stats["link_lost"] += len(lost)
            await self._decline(lost, "link_lost", lambda t: f"{t[3]} dropped after the request was written")

    # -- time ------------------------------------------------------------------------------------
    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        period = max(0.01, min(self._ttl / 10, 0.25))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            dl = self._deadlines
            expired = []
            while dl and dl[0][0] <= now:
                deadline, key = dl.popleft()
                ticket = self.open.get(key)
                if ticket is None or ticket[0] != deadline:
                    continue  # answered, or a newer ticket under the same key
                del self.open[key]
                self.stats["timeouts"] += 1
                expired.append((key, ticket))
            if expired:
                try:
                    await self._decline(expired, "timeout", lambda t: f"no reply within {self._ttl:g}s from {t[3]}")
                except Exception:  # noqa: BLE001 (the sweeper must go on)
                    self.log.exception("%s: timeouts not handled", self.name)
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
        old, self._take_from = self._take_from, None
        if old is not None and old._successor is self and old.state is GearState.STARTED:
            self._give_back(old)  # our swap was rolled back: the running version keeps its tickets
        self._successor = None
        for u in self._unsubs:
            u()
        self._unsubs.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        if self.mirror is not None:
            mirror, self.mirror = self.mirror, None
            await mirror.stop()
        if self.reversals is not None:
            reversals, self.reversals = self.reversals, None
            await reversals.stop()

    def metrics(self) -> dict:
        m = super().metrics()
        m.update(self.stats)
        m["open_tickets"] = len(self.open)
        m["links_up"] = sum(1 for v in self._link_up.values() if v)
        if self.reversals is not None:
            m.update(self.reversals.metrics())
        if self.mirror is not None:
            m.update(self.mirror.metrics())
        return m
