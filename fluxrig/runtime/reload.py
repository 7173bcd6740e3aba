"""What a swap reports and how it fails: `ReloadReport`, `ReloadError`, `GearStartError`, and
the diff that decides which gears a swap keeps.

The swap itself is `Runtime.swap` (graph.py): cold start, reload, kill and shutdown all go
through it.

The diff, per gear name of this Rack: a gear whose type, config and placement are unchanged
is *kept* (the same object, with its sockets, connections and in-flight state); a gear whose
spec changed is *rebuilt*; new names are *added*; missing names are *removed*. A swap from
the empty graph (cold start) adds every gear; a swap to it removes every gear.

Every swap produces a `ReloadReport` (versions, kept/rebuilt/added/removed, durations), also
carried by the `ReloadError` of a swap that was refused or rolled back.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import FluxError
from ..scenario.model import GearSpec
from ..wire.messages import ReloadOutcome

__all__ = ["ReloadReport", "ReloadError", "GearStartError", "diff_gears"]


#: What a swap did; the wire's ReloadOutcome (the Rack logs it and ships it as a trace).
ReloadReport = ReloadOutcome


class ReloadError(FluxError):
    """A swap was refused or rolled back; the running graph is unchanged. `report` says
    what the swap would have done and why it did not (`report.reason`)."""

    def __init__(self, reason: str, report: ReloadReport):
        self.reason = reason
        self.report = report
        super().__init__(reason)


class GearStartError(ReloadError):
    """Gear `gear`'s start() raised `cause`; the swap was rolled back (every gear it started
    is stopped again, the running graph is unchanged)."""

    def __init__(self, gear: str, cause: BaseException, report: ReloadReport):
        self.gear = gear
        self.cause = cause
        super().__init__(f"gear {gear} failed to start: {type(cause).__name__}: {cause}", report)


def _same(a: GearSpec, b: GearSpec) -> bool:
    return a.type == b.type and a.config == b.config and (a.deploy or "") == (b.deploy or "")


def diff_gears(old: Iterable[GearSpec], new: Iterable[GearSpec]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(kept, rebuilt, added, removed) gear names, from this Rack's old and new gear specs."""
    old_specs = {s.name: s for s in old}
    new_specs = {s.name: s for s in new}
    kept = [n for n, s in new_specs.items() if n in old_specs and _same(old_specs[n], s)]
    rebuilt = [n for n, s in new_specs.items() if n in old_specs and not _same(old_specs[n], s)]
    added = [n for n in new_specs if n not in old_specs]
    removed = [n for n in old_specs if n not in new_specs]
    return kept, rebuilt, added, removed
