"""Signed control verbs, Mixer side: sign a command, publish it to the Rack, confirm it took effect.

`CommandSender(registry, key, bus).send(rack, cmd, ...)` signs a fluxrig.ctrl command (kill,
revive, gear-stop, conn-close, shutdown, log-level) with the cluster key (the passport key; a
Rack verifies against the key it pinned), bound to the Rack's id, with a fresh nonce and `ttl`
seconds of validity, and publishes it on `flux.ctrl.<rack>.<cmd>` (core NATS: a command is
worth sending only to a Rack that is there; an expired one would be refused anyway).

Level-triggered kill state (`KillStates`, table `kill_state`). Kill and revive first record
the desired state with a new serial (one per Rack, growing), and the command carries that
serial. The heartbeat handler (controller.py) compares it with the serial the Rack reports in
`stats.ctrl.serial` and, while the Rack is behind, puts a freshly signed kill or revive with
the desired serial in the heartbeat reply (`desired_command`): a Rack that was reconnecting
when the command was sent converges within one heartbeat of being heard again. When the bus
is down the desired state is still recorded (503 says so) and delivered the same way. The Rack answers with an immediate heartbeat whose
`stats.ctrl.recent` holds the outcome under the command's nonce; `send` waits up to `wait`
seconds for it and says `applied`, `refused` (with the Rack's reason), `failed` or `sent` (no
confirmation in time: the Rack is offline or slow; the command stays valid until it expires).

Every command sent is recorded in `rack_events` (when: the row's time; what: `ctrl.<cmd>` with
the reason, nonce, arguments and kill-state serial; who: `by=<actor>`, the API caller), the
audit trail an operator reads with `fluxrig admin racks show`; a re-send in a heartbeat reply
is logged once per serial. The row is a revision of the Rack's record in the shared state
(`record`, rackstate.SharedRegistry.record_event), so every node of a cluster lists it; when
the shared state cannot take it (no quorum: up to its 3 s write timeout) it is kept in this
node's file only, logged at ERROR.

Raises: RackNotFound (404), CommandNotAllowed (409: a removed Rack), SnakeUnavailable (503:
the Mixer's bus connection is down, nothing was sent; a kill or revive's desired state is
recorded all the same), fluxrig.ctrl.CommandRefused (400: bad
arguments, e.g. a ttl above fluxrig.ctrl.MAX_COMMAND_TTL_S).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from fluxrig import ctrl as C
from fluxrig.errors import FluxError
from fluxrig.passport import ClusterKey
from fluxrig.wire import subjects as S
from fluxrig.wire.vocab import ApplyState, RackStatus

from .registry import RackRow, Registry

__all__ = [
    "CommandSender",
    "CommandBus",
    "KillState",
    "KillStates",
    "CommandNotAllowed",
    "SnakeUnavailable",
    "DEFAULT_WAIT_S",
    "MAX_WAIT_S",
    "CONFIRM_POLL_S",
    "PUBLISH_FLUSH_S",
]

log = logging.getLogger("fluxrig.mixer.commands")

DEFAULT_WAIT_S = 5.0
MAX_WAIT_S = 30.0
CONFIRM_POLL_S = 0.05
PUBLISH_FLUSH_S = 2.0


class CommandNotAllowed(FluxError):
    """The Rack (`rack`) cannot take commands in its status (`status`)."""

    def __init__(self, rack: str, status: str):
        self.rack = rack
        self.status = status
        super().__init__(f"rack {rack} is {status}: it takes no commands")


class SnakeUnavailable(FluxError):
    """The Mixer's own bus connection is down; nothing was sent."""

    def __init__(self, detail: str = ""):
        super().__init__(
            "the Snake is not reachable from the Mixer; nothing was sent" + (f": {detail}" if detail else "")
        )


class CommandBus(Protocol):
    """What sending needs of the Mixer's bus connection (a nats.aio.client.Client)."""

    @property
    def is_connected(self) -> bool: ...

    async def publish(self, subject: str, payload: bytes) -> None: ...

    async def flush(self, timeout: float) -> None: ...


@dataclass(frozen=True, slots=True)
class KillState:
    """The desired kill state of one Rack: killed or not, as of kill-state `serial`."""

    rack_id: str
    serial: int
    killed: bool
    reason: str = ""
    at: float = 0.0


class KillStates:
    """Desired kill state per Rack in table `kill_state` (event-loop thread), cached."""

    DDL = """CREATE TABLE IF NOT EXISTS kill_state(
        rack_id VARCHAR PRIMARY KEY, serial BIGINT NOT NULL, killed BOOLEAN NOT NULL,
        reason VARCHAR, set_at DOUBLE)"""

    def __init__(self, db):
        self.db = db
        db.conn.execute(self.DDL)
        self._cache: dict[str, KillState] = {
            r[0]: KillState(r[0], int(r[1]), bool(r[2]), r[3] or "", float(r[4] or 0.0))
            for r in db.conn.execute("SELECT rack_id, serial, killed, reason, set_at FROM kill_state").fetchall()
        }

    def get(self, rack_id: str) -> KillState | None:
        return self._cache.get(rack_id)

    def _store(self, state: KillState) -> KillState:
        self.db.conn.execute(
            "INSERT OR REPLACE INTO kill_state VALUES (?, ?, ?, ?, ?)",
            [state.rack_id, state.serial, state.killed, state.reason, state.at],
        )
        self._cache[state.rack_id] = state
        return state

    def want(self, rack_id: str, killed: bool, reason: str = "") -> KillState:
        """Record a new desired state with the next serial (stored before anything is sent)."""
        current = self._cache.get(rack_id)
        return self._store(KillState(rack_id, (current.serial if current else 0) + 1, killed, reason, time.time()))

    def observe(self, rack_id: str, serial: int, killed: bool) -> None:
        """A Rack reports a serial above ours (a Mixer restored from an older backup): adopt it,
        so the next kill or revive is newer than what the Rack has."""
        current = self._cache.get(rack_id)
        if serial > (current.serial if current else 0):
            log.warning("rack %s reports kill-state serial %d, above the Mixer's %d: adopted (%s)", rack_id,
                        serial, current.serial if current else 0, "killed" if killed else "not killed")  # fmt: skip
            self._store(KillState(rack_id, serial, killed, "reported by the Rack", time.time()))


class CommandSender:
    """Signs, sends and confirms control commands (see the module docstring)."""

    def __init__(self, registry: Registry, key: ClusterKey, bus: CommandBus | None, kill_states=None):
        self.registry = registry
        self.key = key
        self.bus = bus
        self.kill_states = kill_states if kill_states is not None else KillStates(registry.db)
        self._resent: set[tuple[str, int]] = set()  # (rack_id, serial) logged once
        #: The shared state (rackstate.SharedRegistry), set by the controller once it is open:
        #: audit rows then land in the Rack's record's history, so every node's rack_events has them.
        self.shared = None

    # -- the level-triggered kill state (heartbeat replies) ------------------------------------------

    def desired_command(self, rack: RackRow, stats: dict | None) -> bytes:
        """A freshly signed kill or revive when the Rack's reported kill-state serial is behind
        the desired one; b"" otherwise (also for a Rack that reports no serial: an older build)."""
        ctrl = (stats or {}).get("ctrl") if isinstance(stats, dict) else None
        if not isinstance(ctrl, dict) or rack.status == RackStatus.REMOVED:
            return b""
        reported = ctrl.get("serial")
        if not isinstance(reported, int) or isinstance(reported, bool) or reported < 0:
            return b""
        self.kill_states.observe(rack.rack_id, reported, bool(ctrl.get("killed")))
        want = self.kill_states.get(rack.rack_id)
        if want is None or want.serial <= reported:
            return b""
        cmd = C.CMD_KILL if want.killed else C.CMD_REVIVE
        command = C.new_command(cmd, rack.rack_id, rack.name, reason=want.reason, serial=want.serial)
        if (rack.rack_id, want.serial) not in self._resent:
            self._resent.add((rack.rack_id, want.serial))
            log.warning("kill switch: rack %s is at kill-state serial %d, the Mixer wants %d (%s): sent in "
                        "the heartbeat reply", rack.name, reported, want.serial, cmd)  # fmt: skip
        return C.sign_command(self.key, command)

    # -- sending -------------------------------------------------------------------------------------

    async def record(self, rack: RackRow, event: str, detail: str) -> None:
        """One audit row for a command sent: in the shared state when there is one (every node
        lists it), else, or when the shared state cannot take it, in this node's file (said)."""
        shared = self.shared
        if shared is not None:
            try:
                await shared.record_event(rack.rack_id, event, detail)
                return
            except Exception as exc:  # noqa: BLE001 (the command is out: keep the row here at least)
                log.error("%s for rack %s: audit row not in the shared state (%s); kept on this node only",
                          event, rack.name, exc)  # fmt: skip
        try:
            self.registry.record_event(rack, event, detail)
        except Exception as exc:  # the command is out; a failed audit row must not hide that
            log.error("could not record %s for rack %s in rack_events: %s", event, rack.name, exc)

    async def _audit(self, rack: RackRow, command: C.Command, actor: str, sent: bool = True) -> None:
        detail = f"by={actor or 'unknown'} reason={command.reason!r} nonce={command.nonce.hex()}"
        if command.gear:
            detail += f" gear={command.gear}"
        if command.conn_id:
            detail += f" conn={command.conn_id}"
        if command.level:
            detail += f" level={command.level}"
        if command.serial:
            detail += f" serial={command.serial}"
        if not sent:
            detail += " not-sent=bus-down"
        await self.record(rack, f"ctrl.{command.cmd}", detail)

    def _outcome(self, rack_id: str, nonce: str) -> dict | None:
        stats = self.registry.get(rack_id, include_removed=True).stats or {}
        for item in (stats.get("ctrl") or {}).get("recent") or ():
            if isinstance(item, dict) and item.get("nonce") == nonce:
                return item
        return None

    def _reached(self, rack_id: str, serial: int, killed: bool) -> bool:
        """The Rack reports the kill state of `serial` (or a newer one): it took effect."""
        if not serial:
            return False
        ctrl = (self.registry.get(rack_id, include_removed=True).stats or {}).get("ctrl") or {}
        reported = ctrl.get("serial")
        return isinstance(reported, int) and reported >= serial and bool(ctrl.get("killed")) == killed

    async def send(
        self,
        rack_key: str,
        cmd: str,
        *,
        gear: str = "",
        conn_id: str = "",
        reason: str = "",
        level: str = "",
        ttl: float = C.DEFAULT_COMMAND_TTL_S,
        wait: float = DEFAULT_WAIT_S,
        actor: str = "api",
    ) -> dict:
        """Sign and send one command; see the module docstring for the answer. `actor` names
        who asked (the audit row's `by=`)."""
        rack = self.registry.get(rack_key)
        if rack.status == RackStatus.REMOVED:
            raise CommandNotAllowed(rack.name, rack.status)
        # Checked before the kill state moves: a bad argument changes nothing.
        C.new_command(cmd, rack.rack_id, rack.name, gear=gear, conn_id=conn_id, reason=reason, level=level, ttl=ttl)
        serial = 0
        if cmd in C.KILL_STATE_COMMANDS:
            serial = self.kill_states.want(rack.rack_id, cmd == C.CMD_KILL, reason).serial
        command = C.new_command(cmd, rack.rack_id, rack.name, gear=gear, conn_id=conn_id, reason=reason,
                                level=level, serial=serial, ttl=ttl)  # fmt: skip
        data = C.sign_command(self.key, command)
        bus = self.bus
        later = f"the desired kill state is recorded (serial {serial}): the Rack gets it when heard" if serial else ""
        if bus is None or not bus.is_connected:
            await self._audit(rack, command, actor, sent=False)
            raise SnakeUnavailable(later)
        try:
            await bus.publish(S.ctrl(rack.name, cmd), data)
            await bus.flush(timeout=PUBLISH_FLUSH_S)
        except Exception as exc:
            await self._audit(rack, command, actor, sent=False)
            raise SnakeUnavailable(f"{exc}; {later}" if later else str(exc)) from None
        await self._audit(rack, command, actor)
        log.warning(
            "control: %s sent to rack %s by %s (%s)%s",
            cmd,
            rack.name,
            actor or "unknown",
            reason or "no reason given",
            "".join(
                f", {k} {v}" for k, v in (("gear", gear), ("conn", conn_id), ("level", level), ("serial", serial)) if v
            ),  # fmt: skip
        )
        nonce = command.nonce.hex()
        deadline = time.monotonic() + max(0.0, min(wait, MAX_WAIT_S))
        outcome = self._outcome(rack.rack_id, nonce)
        reached = self._reached(rack.rack_id, serial, cmd == C.CMD_KILL)
        # A kill or revive refused on the way (e.g. the Rack's clock not synced yet) may still be
        # carried out by the re-send in a heartbeat reply: wait for that state too.
        while (outcome is None or (not outcome.get("ok") and serial)) and not reached:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(CONFIRM_POLL_S)
            outcome = self._outcome(rack.rack_id, nonce) or outcome
            reached = self._reached(rack.rack_id, serial, cmd == C.CMD_KILL)
        if reached or (outcome is not None and outcome.get("ok")):
            status = ApplyState.APPLIED
        elif outcome is None:
            status = "sent"
        else:
            status = "refused" if str(outcome.get("detail", "")).startswith("refused") else "failed"
        row = self.registry.get(rack.rack_id, include_removed=True)
        return {
            "status": status,
            "rack": rack.name,
            "command": command.summary(),
            "outcome": outcome,
            "killswitch": (row.stats or {}).get("ctrl"),
            **({"kill_state": {"serial": serial, "killed": cmd == C.CMD_KILL}} if serial else {}),
        }
