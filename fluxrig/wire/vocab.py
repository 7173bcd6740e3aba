"""The words Rack and Mixer share, spelled once: statuses, apply states, log levels, telemetry
kinds, control verbs. Each is a `StrEnum`, so a member compares equal to its wire string and
encodes as one (CBOR, JSON, DuckDB) without conversion.

Nothing else in either program spells these strings: a status or a verb written anywhere else
is a bug (a typo there would be a silent "no match").
"""

from __future__ import annotations

import logging
from enum import StrEnum

__all__ = [
    "RackStatus",
    "ApplyState",
    "HelloStatus",
    "LogLevel",
    "TelemetryKind",
    "CtrlVerb",
    "CommandVerb",
    "SafOp",
    "TRAFFIC_STATUSES",
    "TRACE_LEVEL",
]


class RackStatus(StrEnum):
    """A Rack's status as the Mixer's registry and the Rack's passport carry it.

    `unenrolled` exists only on the Rack (no passport yet); `new` only in the Mixer's transition
    table (a Rack not registered yet)."""

    UNENROLLED = "unenrolled"
    NEW = "new"
    PENDING = "pending"
    ACTIVE = "active"
    OFFLINE = "offline"
    SUSPENDED = "suspended"
    REMOVED = "removed"


#: Statuses whose bus user may carry telemetry and guaranteed-lane traffic (the Mixer grants the
#: full permissions only to these; pending and suspended Racks keep their WALs until then).
TRAFFIC_STATUSES = frozenset({RackStatus.ACTIVE, RackStatus.OFFLINE})


class ApplyState(StrEnum):
    """What became of the scenario a passport carried, reported on every heartbeat."""

    NONE = "none"
    APPLYING = "applying"
    APPLIED = "applied"
    REJECTED = "rejected"


class HelloStatus(StrEnum):
    """The Mixer's answer to a Hello."""

    PENDING = "pending"
    ACTIVE = "active"
    DENIED = "denied"
    # This identity was removed by the operator: the Rack must stop enrolling by itself.
    REMOVED = "removed"


#: Below logging.DEBUG: per-message tracing (fluxrig.logs registers the name).
TRACE_LEVEL = 5


class LogLevel(StrEnum):
    """Log levels an operator or the Mixer may set on a Rack."""

    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        """The `logging` level number."""
        return TRACE_LEVEL if self is LogLevel.TRACE else getattr(logging, self.name)

    @classmethod
    def parse(cls, text: str) -> LogLevel:
        """`text` case-insensitively ("warn" is accepted for warning); ValueError naming the choices."""
        t = str(text).strip().lower()
        if t == "warn":
            t = "warning"
        try:
            return cls(t)
        except ValueError:
            raise ValueError(f"unknown log level {text!r}: use {', '.join(m.value for m in cls)}") from None


class TelemetryKind(StrEnum):
    """The three telemetry streams (OTel signals), each its own subject and table."""

    LOGS = "logs"
    METRICS = "metrics"
    TRACES = "traces"


class CtrlVerb(StrEnum):
    """Passport pushes on `flux.ctrl.<rack>.<verb>`: the passport inside is the signed object
    (bound to the Rack's id, ordered by its serial: an old one replayed is ignored)."""

    RELOAD = "reload"
    PASSPORT = "passport"


class CommandVerb(StrEnum):
    """Signed control verbs on `flux.ctrl.<rack>.<verb>`: the body is a signed command (Mixer
    key, target Rack id, nonce, expiry), never a plain control map (fluxrig/ctrl.py)."""

    KILL = "kill"
    REVIVE = "revive"
    GEAR_STOP = "gear-stop"
    CONN_CLOSE = "conn-close"
    SHUTDOWN = "shutdown"
    LOG_LEVEL = "log-level"
    # Store and forward of owed reversals (issue 16): args.op is one of SafOp, args.saga the
    # reversal's id; sent as a request, the Rack answers on the reply subject (SafAnswer).
    SAF = "saf"


class SafOp(StrEnum):
    """What a `saf` command asks of a Rack's conductor gears (fluxrig/saga/ops.py)."""

    LIST = "list"
    SHOW = "show"
    RETRY = "retry"
    PARK = "park"
