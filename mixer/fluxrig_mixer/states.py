"""A Rack's status in the Mixer, as a transition table (STYLE §6).

    new ──enroll──────────▶ pending ──approve──▶ active ◀──heard── offline
    new ──enroll_adopted──▶ active  ──silent───▶ offline
    pending|active|offline ──suspend──▶ suspended ──activate──▶ active
    any but removed ──remove──▶ removed
    any but removed ──rename──▶ itself (the name changes, the status stays; issue 13)

`new` is the pseudo-state of a Rack not registered yet. The table is also written into the
registry (table `rack_status_transitions`) and the registry changes a status only through a
join with it, so the database itself refuses an illegal transition.

Bus permissions follow the status (`FULL_BUS_STATUSES`): active and offline Racks may publish
telemetry and data; pending and suspended ones may only say Hello and heartbeat; removed
Racks have no bus user at all.
"""

from __future__ import annotations

from fluxrig.errors import FluxError
from fluxrig.wire.vocab import TRAFFIC_STATUSES, RackStatus

__all__ = [
    "STATUSES",
    "EVENTS",
    "TRANSITIONS",
    "FULL_BUS_STATUSES",
    "BUS_STATUSES",
    "IllegalTransition",
    "next_status",
]

STATUSES = (RackStatus.PENDING, RackStatus.ACTIVE, RackStatus.OFFLINE, RackStatus.SUSPENDED, RackStatus.REMOVED)
EVENTS = ("enroll", "enroll_adopted", "approve", "suspend", "activate", "silent", "heard", "remove", "rename")

TRANSITIONS: dict[tuple[str, str], str] = {
    (RackStatus.NEW, "enroll"): RackStatus.PENDING,
    (RackStatus.NEW, "enroll_adopted"): RackStatus.ACTIVE,
    (RackStatus.PENDING, "approve"): RackStatus.ACTIVE,
    (RackStatus.ACTIVE, "silent"): RackStatus.OFFLINE,
    (RackStatus.OFFLINE, "heard"): RackStatus.ACTIVE,
    (RackStatus.PENDING, "suspend"): RackStatus.SUSPENDED,
    (RackStatus.ACTIVE, "suspend"): RackStatus.SUSPENDED,
    (RackStatus.OFFLINE, "suspend"): RackStatus.SUSPENDED,
    (RackStatus.SUSPENDED, "activate"): RackStatus.ACTIVE,
    (RackStatus.PENDING, "remove"): RackStatus.REMOVED,
    (RackStatus.ACTIVE, "remove"): RackStatus.REMOVED,
    (RackStatus.OFFLINE, "remove"): RackStatus.REMOVED,
    (RackStatus.SUSPENDED, "remove"): RackStatus.REMOVED,
    # A rename keeps the status (a removed Rack's name is released, not renamed: 409).
    (RackStatus.PENDING, "rename"): RackStatus.PENDING,
    (RackStatus.ACTIVE, "rename"): RackStatus.ACTIVE,
    (RackStatus.OFFLINE, "rename"): RackStatus.OFFLINE,
    (RackStatus.SUSPENDED, "rename"): RackStatus.SUSPENDED,
}

FULL_BUS_STATUSES = TRAFFIC_STATUSES
BUS_STATUSES = frozenset({RackStatus.PENDING, RackStatus.ACTIVE, RackStatus.OFFLINE, RackStatus.SUSPENDED})


class IllegalTransition(FluxError):
    """`event` is not allowed from `status` (e.g. approving a suspended Rack); `allowed` lists
    the events that are."""

    def __init__(self, rack: str, status: str, event: str):
        self.rack = rack
        self.status = status
        self.event = event
        self.allowed = sorted(e for (s, e) in TRANSITIONS if s == status)
        super().__init__(f"rack {rack} is {status}: cannot {event} (allowed: {', '.join(self.allowed) or 'nothing'})")


def next_status(rack: str, status: str, event: str) -> str:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise IllegalTransition(rack, status, event) from None
