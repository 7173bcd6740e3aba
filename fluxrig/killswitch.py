"""The Rack's kill switch: verify signed commands, keep the killed state on disk, act on them.

Commands arrive from the agent (`flux.ctrl.<rack>.<verb>`, verbs in S.CTRL_COMMANDS) as the
raw bytes the Mixer signed; `KillSwitch.handle` verifies them with fluxrig.ctrl against the
Rack's pinned Mixer key(s) and its own rack id, then acts through the Rack (`target`, see
`KillTarget`):

    kill        stop every gear now (connections closed, listeners closed: new traffic is
                refused), run none until revived; the state is written to disk first, so a
                Rack restarted while killed starts no gear
    revive      clear the killed state (and the stopped gears) and run the passport's scenario
    gear-stop   stop one gear now (until revive or a Rack restart; kept stopped across reloads)
    conn-close  relay `conn.close {conn_id, reason}` on the in-Rack control bus to the named gear,
                or to every gear (conn ids are unique), which io_tcp/io_iso8583/io_serial honour

Anything that does not verify (unsigned, forged, another key, another Rack, replayed,
expired, malformed) is ignored: logged at WARNING (at most REFUSAL_LOGS_PER_MINUTE a minute,
the rest counted) and counted by reason. `status()` (sent with every heartbeat) says whether
the Rack is killed, which gears are stopped, the counters and the last few outcomes by
nonce, which is how the Mixer confirms a command took effect.

State file `<state_dir>/killswitch.json` (mode 0600, written atomically with fsyncs of the
file and its directory): the killed state and the nonce cache, so a command cannot be
replayed across a restart either. A state file that cannot be read keeps the Rack killed
(fail closed) and says how to recover: revive from the Mixer, or delete the file on the box.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Protocol

from .fileutil import write_private_atomic
from . import ctrl as C
from .errors import FluxError

__all__ = ["KillSwitch", "KillTarget", "RackKilled", "STATE_FILE", "RECENT_RESULTS", "REFUSAL_LOGS_PER_MINUTE"]

log = logging.getLogger("fluxrig.killswitch")

STATE_FILE = "killswitch.json"
STATE_FORMAT = 1
# Outcomes kept for the heartbeat (the Mixer matches its command's nonce there); small on purpose:
# the heartbeat's stats are capped in size by the Mixer.
RECENT_RESULTS = 8
REFUSAL_LOGS_PER_MINUTE = 60
MAX_DETAIL_CHARS = 200


class RackKilled(FluxError):
    """The Rack is killed by the Mixer's kill switch: it runs no scenario until revived.
    `reason` is the operator's reason, `since` the unix time of the kill."""

    def __init__(self, reason: str, since: float):
        self.reason = reason
        self.since = since
        super().__init__(f"rack killed by the Mixer's kill switch ({reason or 'no reason given'}); "
                         "it runs no gear until revived")


class KillTarget(Protocol):
    """What the kill switch needs from the Rack (fluxrig.rack.Rack implements it)."""

    async def kill_gears(self, reason: str) -> None: ...

    async def revive_gears(self) -> None: ...

    async def stop_gear(self, name: str) -> bool: ...

    def close_connection(self, gear: str, conn_id: str, reason: str) -> int: ...


class KillSwitch:
    def __init__(self, state_dir: str, *, file_name: str = STATE_FILE,
                 nonce_capacity: int = C.DEFAULT_NONCE_CAPACITY, clock=time.time):
        self.path = os.path.join(state_dir, file_name)
        self.nonce_capacity = nonce_capacity
        self.clock = clock
        self.nonces = C.NonceCache(nonce_capacity)
        self.killed: dict | None = None  # {"reason", "since", "nonce"} while killed
        self.stopped_gears: dict[str, str] = {}  # name -> reason (memory only)
        self.accepted = 0
        self.refused = 0
        self.refused_by: dict[str, int] = {}
        self.persist_errors = 0
        self.recent: deque = deque(maxlen=RECENT_RESULTS)
        self._log_window = (0.0, 0)  # (minute start, refusals logged in it)

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
            self.killed = killed
            self.nonces = C.NonceCache.from_state(doc.get("nonces") or {}, self.nonce_capacity)
        except FileNotFoundError:
            self.killed = None
        except (OSError, ValueError, TypeError) as exc:
            self.killed = {"reason": f"kill switch state unreadable ({exc}); kept killed to be safe",
                           "since": self.clock(), "nonce": ""}
            log.error("%s is unreadable (%s): the Rack stays killed. Revive it from the Mixer "
                      "(fluxrig admin racks revive), or delete the file on this box.", self.path, exc)
        if self.killed is not None:
            log.error("this Rack was killed by the Mixer (%s) at %s: no gear runs until it is revived",
                      self.killed.get("reason") or "no reason given",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(self.killed.get("since") or 0))))

    def _persist(self) -> str:
        """Write the state; '' or the error text (the command still takes effect in memory)."""
        doc = {"v": STATE_FORMAT, "killed": self.killed, "nonces": self.nonces.to_state()}
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
        Never raises for a bad command (it is refused, logged and counted)."""
        now = self.clock()
        try:
            if not rack_id:
                raise C.CommandRefused("this Rack has no passport yet: it cannot tell whose commands to take")
            command = C.verify_command(data, list(pins or ()), rack_id, self.nonces, verb=verb, now=now)
        except C.CommandRefused as exc:
            return self._refused(verb, data, exc, now)
        self.accepted += 1
        log.warning("kill switch: %s accepted (%s)%s", command.cmd, command.reason or "no reason given",
                    "".join(f", {k} {v}" for k, v in (("gear", command.gear), ("conn", command.conn_id)) if v))
        try:
            detail = await self._apply(command, now, target)
            ok = True
        except Exception as exc:  # the command verified; the Rack could not carry it out
            log.exception("kill switch: %s failed", command.cmd)
            detail, ok = f"failed: {type(exc).__name__}: {exc}", False
        outcome = {"nonce": command.nonce.hex(), "cmd": command.cmd, "ok": ok, "detail": detail[:MAX_DETAIL_CHARS],
                   "at": round(now, 3)}
        self.recent.append(outcome)
        return outcome

    async def _apply(self, c: C.Command, now: float, target: KillTarget) -> str:
        if c.cmd == C.CMD_KILL:
            # Disk first: a crash half-way through stopping gears must restart killed.
            self.killed = {"reason": c.reason, "since": now, "nonce": c.nonce.hex()}
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
            return "revived" + (f" (restarted stopped gears {', '.join(stopped)})" if stopped else "") + \
                (f"; {note}" if note else "")
        note = self._persist()  # the nonce, so the command cannot be replayed after a restart
        suffix = f"; {note}" if note else ""
        if c.cmd == C.CMD_GEAR_STOP:
            if self.killed is not None:
                return "rack is killed: no gear runs" + suffix
            if not await target.stop_gear(c.gear):
                return f"no gear {c.gear!r} runs on this Rack" + suffix
            self.stopped_gears[c.gear] = c.reason
            return f"gear {c.gear} stopped" + suffix
        n = target.close_connection(c.gear, c.conn_id, c.reason or "kill switch")
        return f"conn.close {c.conn_id} delivered to {n} gear(s)" + suffix

    def _refused(self, verb: str, data: bytes, exc: C.CommandRefused, now: float) -> dict:
        self.refused += 1
        self.refused_by[exc.reason] = self.refused_by.get(exc.reason, 0) + 1
        start, logged = self._log_window
        if now - start >= 60.0:
            if logged > REFUSAL_LOGS_PER_MINUTE:
                log.warning("kill switch: %d more refused commands were not logged", logged - REFUSAL_LOGS_PER_MINUTE)
            start, logged = now, 0
        logged += 1
        self._log_window = (start, logged)
        if logged <= REFUSAL_LOGS_PER_MINUTE:
            log.warning("kill switch: %s command ignored (%s): %s", verb, exc.reason, exc)
        nonce = C.peek_nonce(data)
        outcome = {"nonce": nonce.hex() if nonce else "", "cmd": verb, "ok": False,
                   "detail": f"refused ({exc.reason}): {exc}"[:MAX_DETAIL_CHARS], "at": round(now, 3)}
        self.recent.append(outcome)
        return outcome

    # -- reporting -------------------------------------------------------------------------------

    def status(self) -> dict:
        """For the heartbeat: small (the Mixer caps the stats it keeps)."""
        return {
            "killed": self.killed is not None,
            "reason": (self.killed or {}).get("reason", ""),
            "since": (self.killed or {}).get("since"),
            "stopped_gears": sorted(self.stopped_gears),
            "accepted": self.accepted,
            "refused": self.refused,
            "refused_by": dict(self.refused_by),
            "recent": list(self.recent),
        }

