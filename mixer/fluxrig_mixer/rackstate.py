"""The registry's source of truth in the shared state: every write to a Rack goes through here.

Job. `SharedRegistry` writes Racks to the KV (kv.py) by compare-and-set and keeps the node's
`Registry` (DuckDB file + memory) as a read cache of it; `follow` tasks bring every other
node's writes into that cache. One code path for a single-node Mixer (R1 buckets on its own
nats-server) and a cluster node (R3).

Keys. Bucket `fluxrig-racks`: key = rack id, value = `RackRow.to_record(event)` (its history:
the bucket keeps 16 revisions per key, and each revision's `event` also lands in the cache's
rack_events). Bucket `fluxrig-ids`: `nkey.<NKEY>` claims a bus identity cluster-wide (one
Rack per key; `denied` once removed), `name.<name>` claims a name among Racks not removed.
Bucket `fluxrig-passports`: key = rack id, the passport bytes last signed.

Contract.
- Operator moves (approve, suspend, activate, remove, rename) read the Rack's current record
  from the KV, check the move against the state machine (states.py: IllegalTransition) and
  write it naming the revision read. Another node's (or request's) write in between makes
  this one fail with StateConflict (API 409), nothing written; the winner's change stands.
- Machine writes (apply reports, passport serials, offline/heard moves) are `cas()` writes:
  a conflict is re-read and re-decided (a move no longer legal is dropped), never reported.
- A write that cannot reach a quorum raises StateUnavailable (API 503) and changes nothing
  here: the cache only ever holds what the KV acknowledged.
- `on_bus_change()` is called (debounced) when a change from another node alters who may be
  on the bus (a new Rack, a status crossing FULL_BUS_STATUSES, a name, a removal): the node
  then re-renders its nats-server users (controller.users_changed).
- Migration: on the first start against empty buckets, Racks already in the DuckDB file (a
  Mixer from before the shared state) are written to the KV once (create: a concurrent node
  doing the same cannot duplicate them).

Raises: StateConflict, StateUnavailable (kv.py), IllegalTransition (states.py), RackNotFound,
NameConflict, InvalidRackName (registry.py), FluxError (identity denied or held).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable

from fluxrig.aiotools import cancel_all_and_wait
from fluxrig.errors import FluxError
from fluxrig.ids import uuid7_str
from fluxrig.wire import subjects as S
from fluxrig.wire.vocab import RackStatus

from .kv import MAX_CAS_RETRIES, Buckets, Change, StateConflict, StateUnavailable, follow
from .registry import MAX_LABELS, InvalidRackName, NameConflict, RackNotFound, RackRow, Registry
from .states import FULL_BUS_STATUSES, TRANSITIONS, next_status

__all__ = ["SharedRegistry", "BUS_CHANGE_DEBOUNCE_S", "MAX_NAME_TRIES"]

log = logging.getLogger("fluxrig.mixer.rackstate")

BUS_CHANGE_DEBOUNCE_S = 0.2  # a burst of remote enrollments reloads nats-server once
MAX_NAME_TRIES = 64  # name-2, name-3, ... claimed in turn before giving up


class _MachineRace(Exception):
    """Internal: the record changed under an operator move, but not its status or name."""

    def __init__(self, seen: tuple):
        self.seen = seen


def _event(event: str, frm: str, to: str, detail: str, node: str) -> dict:
    return {"ts": time.time(), "event": event, "from": frm, "to": to, "detail": detail, "node": node}


def _bus_view(row: RackRow | None) -> tuple | None:
    if row is None:
        return None
    return (row.name, row.bus_user, row.status in FULL_BUS_STATUSES, row.status == RackStatus.REMOVED)


class SharedRegistry:
    def __init__(
        self,
        registry: Registry,
        buckets: Buckets,
        node: str,
        on_bus_change: Callable[[], object] | None = None,
    ):
        self.registry = registry
        self.b = buckets
        self.node = node
        self.on_bus_change = on_bus_change
        self._tasks: list[asyncio.Task] = []
        self._bus_dirty: asyncio.Task | None = None
        self.counters = {"conflicts": 0, "remote_changes": 0, "bus_changes": 0}

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Migrate (first start), then follow both buckets; returns once the cache holds the
        shared state's current values."""
        await self._migrate()
        loop = asyncio.get_running_loop()
        ready = [asyncio.Event(), asyncio.Event()]
        self._tasks = [
            loop.create_task(follow(self.b.racks, self._on_racks, ready[0]), name="kv-follow-racks"),
            loop.create_task(follow(self.b.ids, self._on_ids, ready[1]), name="kv-follow-ids"),
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), timeout)

    async def stop(self) -> None:
        await cancel_all_and_wait([*self._tasks, self._bus_dirty])
        self._tasks = []

    async def _migrate(self) -> None:
        local = [r for r in self.registry.list(include_removed=True) if r.revision == 0]
        if not local:
            return
        moved = 0
        for r in local:
            try:
                rev = await self.b.racks.create(
                    r.rack_id, r.to_record(_event("migrate", r.status, r.status, "", self.node))
                )
            except StateConflict:
                continue  # another node (or an earlier start) wrote it: the watch brings it
            if r.bus_user:
                claim = {"rack": r.rack_id, "denied": r.status == RackStatus.REMOVED, "name": r.name}
                try:
                    await self.b.ids.create(f"nkey.{r.bus_user}", claim)
                except StateConflict:
                    pass
            if r.status != RackStatus.REMOVED:
                try:
                    await self.b.ids.create(f"name.{r.name}", {"rack": r.rack_id})
                except StateConflict:
                    pass
            self.registry.apply([(r.to_record(), rev)])
            moved += 1
        if moved:
            log.info("%d rack(s) of this node's registry file written to the shared state", moved)

    # -- following other nodes -------------------------------------------------------------------

    async def _on_racks(self, changes: list[Change], initial: bool) -> None:
        recs = [(c.value, c.revision) for c in changes if isinstance(c.value, dict) and "id" in c.value]
        if not recs:
            return
        applied = self.registry.apply(recs)
        self.counters["remote_changes"] += len(applied)
        if any(_bus_view(old) != _bus_view(new) for old, new in applied):
            self._bus_changed()

    async def _on_ids(self, changes: list[Change], initial: bool) -> None:
        denied = []
        for c in changes:
            if c.key.startswith("nkey.") and isinstance(c.value, dict) and c.value.get("denied"):
                denied.append({"nkey": c.key[5:], **c.value})
        if denied and self.registry.apply_denied(denied):
            self._bus_changed()

    def _bus_changed(self) -> None:
        if self.on_bus_change is None or (self._bus_dirty is not None and not self._bus_dirty.done()):
            return
        self.counters["bus_changes"] += 1

        async def later():
            await asyncio.sleep(BUS_CHANGE_DEBOUNCE_S)
            try:
                res = self.on_bus_change()
                if asyncio.iscoroutine(res):
                    await res
            except Exception as exc:
                log.error("re-rendering the bus users failed: %s", exc)

        self._bus_dirty = asyncio.get_running_loop().create_task(later(), name="bus-users-changed")

    # -- reads of the truth ----------------------------------------------------------------------

    async def fresh(self, key: str, include_removed: bool = False) -> RackRow:
        """The Rack as the KV holds it now (by id or name; the name resolved in the cache)."""
        cached = self.registry.get(key, include_removed=True)
        cur = await self.b.racks.get(cached.rack_id)
        if cur is None:
            raise RackNotFound(key)
        self.registry.apply([(cur.value, cur.revision)])
        row = self.registry.get(cached.rack_id, include_removed=True)
        if row.status == RackStatus.REMOVED and not include_removed:
            raise RackNotFound(key)
        return row

    async def _write(self, row: RackRow, event: dict | None) -> RackRow:
        """Write `row` over the revision it was read at; the cache gets the acknowledged value."""
        rec = row.to_record(event)
        try:
            if row.revision:
                rev = await self.b.racks.update(row.rack_id, rec, row.revision)
            else:
                rev = await self.b.racks.create(row.rack_id, rec)
        except StateConflict:
            self.counters["conflicts"] += 1
            raise
        except StateUnavailable:
            # No answer is not "not written": the write may have been committed before the
            # answer was lost (a leader change). Read it back once: our record (its event is
            # unique: time and node) there means it landed.
            try:
                cur = await self.b.racks.get(row.rack_id)
            except StateUnavailable:
                cur = None
            if cur is None or cur.value != json.loads(json.dumps(rec, default=str)):
                raise
            rev = cur.revision
        self.registry.apply([(rec, rev)])
        return self.registry.get(row.rack_id, include_removed=True)

    # -- enrollment ------------------------------------------------------------------------------

    async def find_identity(self, nkey: str) -> dict | None:
        cur = await self.b.ids.get(f"nkey.{nkey}")
        return cur.value if cur is not None else None

    async def _claim_name(self, wanted: str, rack_id: str) -> str:
        base = S.sanitize_rack_name(wanted)
        for n in range(1, MAX_NAME_TRIES + 1):
            suffix = "" if n == 1 else f"-{n}"
            name = base[: S.MAX_RACK_NAME - len(suffix)] + suffix
            holder = self.registry.find(name)
            if holder is not None and holder.rack_id != rack_id:
                continue
            try:
                await self.b.ids.create(f"name.{name}", {"rack": rack_id})
                return name
            except StateConflict:
                cur = await self.b.ids.get(f"name.{name}")
                if cur is not None and cur.value.get("rack") == rack_id:
                    return name
        raise FluxError(f"no free rack name like {wanted!r} after {MAX_NAME_TRIES} tries; name the rack in its token")

    async def _release_name(self, name: str, rack_id: str) -> None:
        cur = await self.b.ids.get(f"name.{name}")
        if cur is not None and cur.value.get("rack") == rack_id:
            try:
                await self.b.ids.delete(f"name.{name}", cur.revision)
            except StateConflict:
                pass

    async def create(
        self,
        name: str,
        host: str = "",
        version: str = "",
        labels: dict | None = None,
        adopted: bool = False,
        *,
        nkey: str,
        detail: str = "",
    ) -> RackRow:
        """Register a new Rack: its identity claimed first (two nodes enrolling the same key at
        once: one Rack), then a unique name, then the record. FluxError when the identity is
        denied or held by another Rack (the caller looks it up: a retried Hello)."""
        rack_id = uuid7_str()
        try:
            await self.b.ids.create(f"nkey.{nkey}", {"rack": rack_id, "denied": False})
        except StateConflict:
            held = await self.find_identity(nkey)
            if held and held.get("denied"):
                raise FluxError("this bus identity was removed; it cannot enroll again") from None
            raise FluxError("this bus identity already belongs to another rack") from None
        final = await self._claim_name(name, rack_id)
        event = "enroll_adopted" if adopted else "enroll"
        status = TRANSITIONS[(RackStatus.NEW, event)]
        at = dt.datetime.fromtimestamp(time.time(), dt.UTC)
        row = RackRow(
            rack_id, final, status, nkey, host, version, dict(list((labels or {}).items())[:MAX_LABELS]),
            first_seen=at, last_seen=at, status_since=at,
        )  # fmt: skip
        out = await self._write(
            row, _event(event, RackStatus.NEW, status, f"name={final}" + (f" {detail}" if detail else ""), self.node)
        )
        self.registry.heard(rack_id)
        log.info("rack %s (%s) registered %s", final, rack_id, status)
        return out

    async def rack_of_identity(self, nkey: str) -> RackRow | None:
        """The Rack (not removed) holding `nkey`: the cache first, else the KV (a Rack another
        node enrolled a moment ago)."""
        row = self.registry.find_by_nkey(nkey)
        if row is not None:
            return row
        held = await self.find_identity(nkey)
        if not held or held.get("denied"):
            return None
        try:
            return await self.fresh(held["rack"])
        except RackNotFound:
            return None

    # -- moves -----------------------------------------------------------------------------------

    async def transition(self, key: str, event: str, detail: str = "", rename: str | None = None) -> RackRow:
        """An operator move (optionally with a new name, in the same write). IllegalTransition,
        StateConflict (someone else moved or renamed the Rack since it was read: 409),
        StateUnavailable. A concurrent machine write (an apply report, a passport serial)
        that left status and name alone is not a conflict: the move is re-read and retried."""
        seen = None
        for _attempt in range(MAX_CAS_RETRIES):
            try:
                return await self._transition(key, event, detail, rename, seen)
            except _MachineRace as race:
                seen = race.seen
        raise StateConflict(self.b.racks.name, key, 0, "the Rack kept changing")

    async def _transition(self, key: str, event: str, detail: str, rename: str | None, seen) -> RackRow:
        before = await self.fresh(key, include_removed=True)
        if seen is not None and (before.status, before.name) != seen:
            # Between our first read and now someone else moved or renamed it: theirs stands.
            raise StateConflict(self.b.racks.name, before.rack_id, 0, f"it is {before.status} now")
        to = next_status(before.name, before.status, event)
        # status_since is when the status last changed: a rename (same status) leaves it.
        since = before.status_since if to == before.status else dt.datetime.now(dt.UTC)
        row = dataclasses.replace(before, status=to, status_since=since)
        old_name = before.name
        if rename and rename != before.name:
            if not S.RACK_NAME_RE.match(rename) or len(rename) > S.MAX_RACK_NAME:
                raise InvalidRackName(rename)
            holder = self.registry.find(rename)
            if holder is not None and holder.rack_id != before.rack_id:
                raise NameConflict(rename)
            try:
                await self.b.ids.create(f"name.{rename}", {"rack": before.rack_id})
            except StateConflict:
                raise NameConflict(rename) from None
            row.name = rename
        try:
            after = await self._write(row, _event(event, before.status, to, detail, self.node))
        except StateConflict:
            if row.name != old_name:
                await self._release_name(row.name, before.rack_id)
            now = await self.b.racks.get(before.rack_id)
            if now is not None and (now.value["status"], now.value["name"]) == (before.status, before.name):
                raise _MachineRace((before.status, before.name)) from None
            raise
        except BaseException:
            if row.name != old_name:
                await self._release_name(row.name, before.rack_id)
            raise
        if row.name != old_name:
            await self._release_name(old_name, before.rack_id)
        if to == RackStatus.REMOVED:
            await self._deny(after, detail or event)
        log.info("rack %s (%s): %s -> %s [%s]", after.name, after.rack_id, before.status, to, event)
        return after

    async def _deny(self, rack: RackRow, reason: str) -> None:
        entry = {"rack": rack.rack_id, "denied": True, "name": rack.name, "at": time.time(), "reason": reason}
        await self.b.ids.cas(f"nkey.{rack.bus_user}", lambda _old: entry)
        await self._release_name(rack.name, rack.rack_id)
        self.registry.apply_denied([{"nkey": rack.bus_user, **entry}])

    async def transition_many(self, rack_ids: list[str], event: str, detail: str = "") -> list[RackRow]:
        """A machine move (silent, heard) for many Racks: each a cas() write, concurrently; a
        Rack for which the move is not legal (any more) is left alone. The Racks that moved."""

        async def one(rack_id: str) -> RackRow | None:
            moved: dict = {}

            def decide(rec):
                if rec is None or (rec["status"], event) not in TRANSITIONS:
                    return None
                to = TRANSITIONS[(rec["status"], event)]
                moved["e"] = _event(event, rec["status"], to, detail, self.node)
                return {**rec, "status": to, "status_since": time.time(), "event": moved["e"]}

            got = await self.b.racks.cas(rack_id, decide)
            if got is None:
                return None
            return got, "e" in moved

        out = await asyncio.gather(*(one(i) for i in rack_ids), return_exceptions=True)
        # One cache transaction for the whole batch: 200 Racks heard again after an outage
        # must not mean 200 DuckDB commits on the event loop (measured: seconds of stall).
        self.registry.apply([(r[0].value, r[0].revision) for r in out if isinstance(r, tuple)])
        moved = []
        for rack_id, r in zip(rack_ids, out, strict=True):
            if isinstance(r, BaseException):
                log.warning("rack %s: %s not written: %s", rack_id, event, r)
            elif r is not None and r[1]:
                moved.append(self.registry.get(rack_id, include_removed=True))
        return moved

    async def update_fields(self, rack_id: str, **fields) -> RackRow:
        """A machine write of plain fields (apply state, host, version, passport serial)."""

        def merge(rec):
            if rec is None:
                raise RackNotFound(rack_id)
            if all(rec.get(k) == v for k, v in fields.items()):
                return None
            return {**rec, **fields, "event": None}

        got = await self.b.racks.cas(rack_id, merge)
        self.registry.apply([(got.value, got.revision)])
        return self.registry.get(rack_id, include_removed=True)

    async def record_event(self, rack_id: str, event: str, detail: str = "") -> None:
        """An audit row that moves no status (a control command sent) as a revision of the
        Rack's record: every node's rack_events gets it through the watch."""

        def note(rec):
            if rec is None:
                raise RackNotFound(rack_id)
            return {**rec, "event": _event(event, rec["status"], rec["status"], detail, self.node)}

        got = await self.b.racks.cas(rack_id, note)
        self.registry.apply([(got.value, got.revision)])

    # -- passports -------------------------------------------------------------------------------

    async def reserve_serial(self, rack_id: str, expires_at: float, target_version: str = "") -> RackRow:
        """The next passport serial, reserved by cas() (two nodes signing at once get two
        serials); with `target_version`, the Rack's apply state becomes `applying`."""

        def bump(rec):
            if rec is None:
                raise RackNotFound(rack_id)
            new = {**rec, "passport_serial": rec["passport_serial"] + 1, "passport_expires": expires_at, "event": None}
            if target_version:
                same = target_version == rec.get("scenario_version") and rec.get("apply_state") == "applied"
                new.update(
                    target_version=target_version, apply_state="applied" if same else "applying", apply_reason=""
                )
            return new

        got = await self.b.racks.cas(rack_id, bump)
        self.registry.apply([(got.value, got.revision)])
        return self.registry.get(rack_id, include_removed=True)

    async def store_passport(self, rack_id: str, data: bytes) -> None:
        await self.b.passports.put(rack_id, data)

    async def load_passport(self, rack_id: str) -> bytes | None:
        cur = await self.b.passports.get(rack_id)
        return cur.value if cur is not None else None

    async def report_apply(self, rack_id: str, version: str, state: str, reason: str) -> bool:
        row = self.registry.get(rack_id, include_removed=True)
        if (row.scenario_version, row.apply_state, row.apply_reason) == (version, state, reason):
            return False
        await self.update_fields(
            rack_id, scenario_version=version, apply_state=state, apply_reason=reason, apply_at=time.time()
        )
        return True
