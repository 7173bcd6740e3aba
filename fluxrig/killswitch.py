"""The Rack's control verbs: verify signed commands, keep the killed state on disk, act on them.

Commands arrive from the agent (`flux.ctrl.<rack>.<verb>`, every CommandVerb; kill and revive
also in heartbeat replies, see "level-triggered" below) as the raw bytes the Mixer signed;
`KillSwitch.handle` verifies them with fluxrig.ctrl against the Rack's pinned Mixer key(s),
its own rack id, and the Mixer's time as the Rack learned it (`time_source`, a
fluxrig.timesync.MixerClock's `judge`: the Rack's own clock is not trusted once synced), then
acts through the Rack (`target`, see `KillTarget`):

    kill        stop every gear now (connections closed, listeners closed: new traffic is
                refused), run none until revived; the state is written to disk first, so a
                Rack restarted while killed starts no gear
    revive      clear the killed state (and the stopped gears) and run the passport's scenario
    gear-stop   stop one gear now (until revive or a Rack restart; kept stopped across reloads)
    conn-close  relay `conn.close {conn_id, reason}` on the in-Rack control bus to the named gear,
                or to every gear (conn ids are unique), which io_tcp/io_iso8583/io_serial honour
    shutdown    drain and exit 0 (the nonce is on disk first: a replay after the restart is refused)
    log-level   set the root log level
    saf         list, show, retry or park the reversals the Rack's conductors owe (target.saf,
                fluxrig/saga/ops.py); the nonce is on disk first; the outcome handed back (not
                the one kept for the heartbeat) carries the answer under `result`

Level-triggered kill state. Kill and revive carry the Mixer's kill-state `serial` (it grows
with each kill or revive the operator sends). The Rack keeps the serial of the state it is in
(on disk) and reports it in `status()["serial"]`; a kill or revive with a serial not above it
is refused as `stale` (an older command overtaken by a newer one). The Mixer re-sends the
desired state, freshly signed, in the heartbeat reply while the reported serial is behind, so
a Rack that missed the command (reconnecting, clock not yet synced) converges within one
heartbeat of being heard again.

Anything that does not verify (unsigned, forged, another key, another Rack, replayed,
expired, stale, malformed) is ignored: logged at WARNING (at most REFUSAL_LOGS_PER_MINUTE a
minute, then one line with how many were not logged) and counted by reason (`metrics()`,
shipped as the `_ctrl` metrics and in every heartbeat). `status()` (sent with every heartbeat) says whether
the Rack is killed, which gears are stopped, the counters and the last few outcomes by
nonce, which is how the Mixer confirms a command took effect.

State file `<state_dir>/killswitch.json` (mode 0600, written atomically with fsyncs of the
file and its directory): the killed state, its serial and the nonce cache, so a command cannot
be replayed across a restart either. A state file that cannot be read keeps the Rack killed
(fail closed) and says how to recover: revive from the Mixer (deleting the file on the box
only helps while the Mixer's desired state is not "killed": it is re-sent on reconnect).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import ctrl as C
from .errors import FluxError
from .fileutil import write_private_atomic
from .timesync import LOCAL_WINDOW_S, ClockSource, Judgement
from .wire.vocab import LogLevel

__all__ = [
    "KillSwitch",
    "KillTarget",
    "RackKilled",
    "CommandStale",
    "STATE_FILE",
    "RECENT_RESULTS",
    "REFUSAL_LOGS_PER_MINUTE",
    "VIA_HEARTBEAT",
]

log = logging.getLogger("fluxrig.killswitch")

STATE_FILE = "killswitch.json"
STATE_FORMAT = 1
#: `verb` of a command that came in a heartbeat reply (no subject): only kill-state verbs.
VIA_HEARTBEAT = ""
# Outcomes kept for the heartbeat (the Mixer matches its command's nonce there); small on purpose:
# the heartbeat's stats are capped in size by the Mixer.
RECENT_RESULTS = 8
REFUSAL_LOGS_PER_MINUTE = C.REFUSAL_LOGS_PER_MINUTE
MAX_DETAIL_CHARS = 200


class RackKilled(FluxError):
    """The Rack is killed by the Mixer's kill switch: it runs no scenario until revived.
    `reason` is the operator's reason, `since` the unix time of the kill."""

    def __init__(self, reason: str, since: float):
        self.reason = reason
        self.since = since
        super().__init__(
            f"rack killed by the Mixer's kill switch ({reason or 'no reason given'}); it runs no gear until revived"
        )


class KillTarget(Protocol):
    """What the kill switch needs from the Rack (fluxrig.rack.Rack implements it)."""

    async def kill_gears(self, reason: str) -> None: ...

    async def revive_gears(self) -> None: ...

    async def stop_gear(self, name: str) -> bool: ...

    def close_connection(self, gear: str, conn_id: str, reason: str) -> int: ...

    def request_shutdown(self, reason: str) -> None: ...

    def set_log_level(self, level: LogLevel) -> None: ...

    async def saf(self, op: str, gear: str, saga: str, why: str) -> dict: ...


class CommandStale(C.CommandRefused):
    """A kill or revive whose kill-state `serial` is not above the state the Rack is in."""

    reason = "stale"

    def __init__(self, serial: int, current: int):
        self.serial = serial
        self.current = current
        super().__init__(f"kill-state serial {serial} is not newer than this Rack's {current}", "args.serial")


class KillSwitch:
    def __init__(
        self,
        state_dir: str,
        *,
        file_name: str = STATE_FILE,
        nonce_capacity: int = C.DEFAULT_NONCE_CAPACITY,
        clock=time.time,
        time_source: Callable[[], Judgement] | None = None,
        refusal_logs_per_minute: int = REFUSAL_LOGS_PER_MINUTE,
    ):
        self.path = os.path.join(state_dir, file_name)
        self.nonce_capacity = nonce_capacity
        self.clock = clock  # the local clock: "since", log windows
        # What freshness is judged by (the Mixer's time once synced); the local clock otherwise.
        self.time_source = time_source or (lambda: Judgement(self.clock(), LOCAL_WINDOW_S, ClockSource.LOCAL))
        self.refusals = C.RefusalLog(log, "kill switch", refusal_logs_per_minute, clock)
        self.nonces = C.NonceCache(nonce_capacity)
        self.killed: dict | None = None  # {"reason", "since", "nonce"} while killed
        self.serial = 0  # the kill-state serial of the last kill or revive applied
        self.stopped_gears: dict[str, str] = {}  # name -> reason (memory only)
        self.accepted = 0
        self.persist_errors = 0
        self.recent: deque = deque(maxlen=RECENT_RESULTS)

    # -- state file ------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file (absent = not killed). Unreadable = killed (fail closed)."""
        try:
            with open(self.path, "rb") as fh:
                doc = json.loads(fh.read())
            if not isinstance(doc, dict) or doc.get("v") != STATE_FORMAT:
                raise ValueError(f"unknown state format {doc.get('v') if isinstance(doc, dict) else doc!r}")
            killed = doc.get("killed")
            if killed is not None and not isinstance(killed, dict):
                raise ValueError("'killed' is not a map")
            serial = doc.get("serial", 0)
            if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
                raise ValueError(f"'serial' is not a non-negative integer: {serial!r}")
            self.killed = killed
            self.serial = serial
            self.nonces = C.NonceCache.from_state(doc.get("nonces") or {}, self.nonce_capacity)
        except FileNotFoundError:
            self.killed = None
        except (OSError, ValueError, TypeError) as exc:
            self.killed = {
                "reason": f"kill switch state unreadable ({exc}); kept killed to be safe",
                "since": self.clock(),
                "nonce": "",
            }
            log.error(
                "%s is unreadable (%s): the Rack stays killed. Revive it from the Mixer "
                "(fluxrig admin racks revive); deleting the file on this box only helps while "
                "the Mixer does not want it killed.",
                self.path,
                exc,
            )
        if self.killed is not None:
            log.error(
                "this Rack was killed by the Mixer (%s) at %s: no gear runs until it is revived",
                self.killed.get("reason") or "no reason given",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(self.killed.get("since") or 0))),
            )

    def _persist(self) -> str:
        """Write the state; '' or the error text (the command still takes effect in memory)."""
        doc = {"v": STATE_FORMAT, "killed": self.killed, "serial": self.serial, "nonces": self.nonces.to_state()}
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            write_private_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode())
            return ""
        except OSError as exc:
            self.persist_errors += 1
            log.error("cannot write %s (%s): the kill switch state will not survive a restart", self.path, exc)
            return f"state not persisted: {exc}"

    def raise_if_killed(self) -> None:
        if self.killed is not None:
            raise RackKilled(str(self.killed.get("reason") or ""), float(self.killed.get("since") or 0.0))

    # -- commands ----------------------------------------------------------------------------------

    async def handle(self, verb: str, data: bytes, *, pins, rack_id: str | None, target: KillTarget) -> dict:
        """Verify and apply one command; returns the outcome recorded for the heartbeat.
        `verb` is the subject's last token, or VIA_HEARTBEAT for the kill state a heartbeat
        reply carried. Never raises for a bad command (it is refused, logged and counted)."""
        now = self.clock()
        try:
            if not rack_id:
                raise C.CommandRefused("this Rack has no passport yet: it cannot tell whose commands to take")
            judged = self.time_source()
            command = C.verify_command(data, list(pins or ()), rack_id, self.nonces, verb=verb or None,
                                       now=judged.now, skew=judged.window)  # fmt: skip
            if verb == VIA_HEARTBEAT and command.cmd not in C.KILL_STATE_COMMANDS:
                raise C.CommandWrongVerb(f"{command.cmd} cannot come in a heartbeat reply", "cmd")
            if command.cmd in C.KILL_STATE_COMMANDS and command.serial and self._stale(command):
                self._persist()  # the nonce is spent either way
                raise CommandStale(command.serial, self.serial)
        except C.CommandRefused as exc:
            return self._refused(verb or "heartbeat", data, exc, now)
        self.accepted += 1
        log.warning(
            "kill switch: %s accepted (%s)%s",
            command.cmd,
            command.reason or "no reason given",
            "".join(f", {k} {v}" for k, v in (("gear", command.gear), ("conn", command.conn_id)) if v),
        )
        result = None
        try:
            if command.cmd == C.CMD_SAF:
                detail, result = await self._saf(command, target)
            else:
                detail = await self._apply(command, now, target)
            ok = True
        except Exception as exc:  # the command verified; the Rack could not carry it out
            log.exception("kill switch: %s failed", command.cmd)
            detail, ok = f"failed: {type(exc).__name__}: {exc}", False
        outcome = {
            "nonce": command.nonce.hex(),
            "cmd": command.cmd,
            "ok": ok,
            "detail": detail[:MAX_DETAIL_CHARS],
            "at": round(now, 3),
        }
        self.recent.append(outcome)
        return outcome if result is None else {**outcome, "result": result}

    async def _saf(self, c: C.Command, target: KillTarget) -> tuple[str, dict]:
        note = self._persist()  # the nonce first: a retry or park cannot be replayed after a restart
        result = await target.saf(c.op, c.gear, c.saga, c.reason)
        detail = f"saf {c.op}{' ' + c.saga if c.saga else ''}: {result.get('detail', '')}"
        return detail + (f"; {note}" if note else ""), result

    def _stale(self, c: C.Command) -> bool:
        """Older than the kill state the Rack is in; the same serial is the same state (a
        re-send while the first one was being applied), unless it asks for the other one."""
        if c.serial != self.serial:
            return c.serial < self.serial
        return (c.cmd == C.CMD_KILL) != (self.killed is not None)

    async def _apply(self, c: C.Command, now: float, target: KillTarget) -> str:
        if c.cmd in C.KILL_STATE_COMMANDS and c.serial:
            self.serial = c.serial
        if c.cmd == C.CMD_KILL:
            # Disk first: a crash half-way through stopping gears must restart killed.
            if self.killed is not None:  # already killed (the level-triggered re-send, or twice)
                self.killed = {**self.killed, "reason": c.reason or self.killed.get("reason", ""),
                               "nonce": c.nonce.hex()}  # fmt: skip
                note = self._persist()
                await target.kill_gears(c.reason)
                return "killed (already)" + (f"; {note}" if note else "")
            # "since" by the best clock: the Mixer's once synced (the local one may be at 1970).
            judged = self.time_source()
            since = judged.now if judged.source is not ClockSource.UNKNOWN else now
            self.killed = {"reason": c.reason, "since": since, "nonce": c.nonce.hex()}
            note = self._persist()
            await target.kill_gears(c.reason)
            return "killed" + (f"; {note}" if note else "")
        if c.cmd == C.CMD_REVIVE:
            was_killed, stopped = self.killed is not None, list(self.stopped_gears)
            self.killed = None
            self.stopped_gears.clear()
            note = self._persist()
            if not was_killed and not stopped:
                return "not killed; nothing to revive" + (f"; {note}" if note else "")
            await target.revive_gears()
            return (
                "revived"
                + (f" (restarted stopped gears {', '.join(stopped)})" if stopped else "")
                + (f"; {note}" if note else "")
            )
        note = self._persist()  # the nonce, so the command cannot be replayed after a restart
        suffix = f"; {note}" if note else ""
        if c.cmd == C.CMD_SHUTDOWN:
            target.request_shutdown(c.reason)
            return "shutting down" + suffix
        if c.cmd == C.CMD_LOG_LEVEL:
            level = LogLevel.parse(c.level)
            target.set_log_level(level)
            return f"log level {level}" + suffix
        if c.cmd == C.CMD_GEAR_STOP:
            if self.killed is not None:
                return "rack is killed: no gear runs" + suffix
            if not await target.stop_gear(c.gear):
                return f"no gear {c.gear!r} runs on this Rack" + suffix
            self.stopped_gears[c.gear] = c.reason
            return f"gear {c.gear} stopped" + suffix
        n = target.close_connection(c.gear, c.conn_id, c.reason or "kill switch")
        return f"conn.close {c.conn_id} delivered to {n} gear(s)" + suffix

    @property
    def refused(self) -> int:
        return self.refusals.refused

    @property
    def refused_by(self) -> dict[str, int]:
        return self.refusals.refused_by

    def _refused(self, verb: str, data: bytes, exc: C.CommandRefused, now: float) -> dict:
        self.refusals.note(f"{verb} command", exc.reason, exc)
        nonce = C.peek_nonce(data)
        outcome = {
            "nonce": nonce.hex() if nonce else "",
            "cmd": verb,
            "ok": False,
            "detail": f"refused ({exc.reason}): {exc}"[:MAX_DETAIL_CHARS],
            "at": round(now, 3),
        }
        self.recent.append(outcome)
        return outcome

    # -- reporting -------------------------------------------------------------------------------

    def status(self) -> dict:
        """For the heartbeat: small (the Mixer caps the stats it keeps)."""
        return {
            "killed": self.killed is not None,
            "reason": (self.killed or {}).get("reason", ""),
            "since": (self.killed or {}).get("since"),
            "serial": self.serial,
            "stopped_gears": sorted(self.stopped_gears),
            "accepted": self.accepted,
            "refused": self.refused,
            "refused_by": dict(self.refused_by),
            "recent": list(self.recent),
        }

    def metrics(self) -> dict:
        """Flat counters for the metrics telemetry (`_ctrl`): accepted, refused, by reason."""
        out = {"commands_accepted": self.accepted, "commands_refused": self.refused,
               "killed": int(self.killed is not None), "kill_serial": self.serial,
               "state_persist_errors": self.persist_errors}  # fmt: skip
        for reason, n in self.refused_by.items():
            out[f"commands_refused_{reason}"] = n
        return out
