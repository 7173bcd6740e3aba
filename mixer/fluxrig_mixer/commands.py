"""Kill switch, Mixer side: sign a command, publish it to the Rack, confirm it took effect.

`send_command(mixer, rack, cmd, ...)` signs a fluxrig.ctrl command with the cluster key (the
passport key; a Rack verifies against the key it pinned), bound to the Rack's id, with a
fresh nonce and `ttl` seconds of validity, and publishes it on `flux.ctrl.<rack>.<cmd>`
(core NATS: a command is worth sending only to a Rack that is there; an expired one would be
refused anyway). The Rack answers with an immediate heartbeat whose `stats.ctrl.recent` holds
the outcome under the command's nonce; `send_command` waits up to `wait` seconds for it and
says `applied`, `refused` (with the Rack's reason), `failed` or `sent` (no confirmation in
time: the Rack is offline or slow; the command stays valid until it expires).

Every command sent is recorded in `rack_events` (`ctrl.<cmd>` with the reason and nonce),
the audit trail an operator reads with `fluxrig admin racks show`.

Raises: RackNotFound (404), CommandNotAllowed (409: a removed Rack), SnakeUnavailable (503:
the Mixer's bus connection is down, nothing was sent), fluxrig.ctrl.CommandRefused (400: bad
arguments, e.g. a ttl above fluxrig.ctrl.MAX_COMMAND_TTL_S).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fluxrig import ctrl as C
from fluxrig.agent import subjects as S
from fluxrig.errors import FluxError

__all__ = ["send_command", "CommandNotAllowed", "SnakeUnavailable", "DEFAULT_WAIT_S", "MAX_WAIT_S"]

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
        super().__init__("the Snake is not reachable from the Mixer; nothing was sent"
                         + (f": {detail}" if detail else ""))


def _audit(mixer, rack, command: C.Command) -> None:
    detail = f"reason={command.reason!r} nonce={command.nonce.hex()}"
    if command.gear:
        detail += f" gear={command.gear}"
    if command.conn_id:
        detail += f" conn={command.conn_id}"
    try:
        mixer.registry.db.conn.execute(
            "INSERT INTO rack_events VALUES (now(), ?, ?, ?, ?, ?)",
            [rack.rack_id, f"ctrl.{command.cmd}", rack.status, rack.status, detail],
        )
    except Exception as exc:  # the command is out; a failed audit row must not hide that
        log.error("could not record %s for rack %s in rack_events: %s", command.cmd, rack.name, exc)


def _outcome(mixer, rack_id: str, nonce: str) -> dict | None:
    stats = mixer.registry.get(rack_id, include_removed=True).stats or {}
    for item in (stats.get("ctrl") or {}).get("recent") or ():
        if isinstance(item, dict) and item.get("nonce") == nonce:
            return item
    return None


async def send_command(mixer, rack_key: str, cmd: str, *, gear: str = "", conn_id: str = "", reason: str = "",
                       ttl: float = C.DEFAULT_COMMAND_TTL_S, wait: float = DEFAULT_WAIT_S) -> dict:
    """Sign and send one kill switch command; see the module docstring for the answer."""
    rack = mixer.registry.get(rack_key)
    if rack.status == "removed":
        raise CommandNotAllowed(rack.name, rack.status)
    command = C.new_command(cmd, rack.rack_id, rack.name, gear=gear, conn_id=conn_id, reason=reason, ttl=ttl)
    data = C.sign_command(mixer.key, command)
    nc = mixer.nc
    if nc is None or not nc.is_connected:
        raise SnakeUnavailable()
    try:
        await nc.publish(S.ctrl(rack.name, cmd), data)
        await nc.flush(timeout=PUBLISH_FLUSH_S)
    except Exception as exc:
        raise SnakeUnavailable(str(exc)) from None
    _audit(mixer, rack, command)
    log.warning("kill switch: %s sent to rack %s (%s)%s", cmd, rack.name, reason or "no reason given",
                "".join(f", {k} {v}" for k, v in (("gear", gear), ("conn", conn_id)) if v))
    nonce = command.nonce.hex()
    deadline = time.monotonic() + max(0.0, min(wait, MAX_WAIT_S))
    outcome = _outcome(mixer, rack.rack_id, nonce)
    while outcome is None and time.monotonic() < deadline:
        await asyncio.sleep(CONFIRM_POLL_S)
        outcome = _outcome(mixer, rack.rack_id, nonce)
    if outcome is None:
        status = "sent"
    elif outcome.get("ok"):
        status = "applied"
    else:
        status = "refused" if str(outcome.get("detail", "")).startswith("refused") else "failed"
    row = mixer.registry.get(rack.rack_id, include_removed=True)
    return {
        "status": status,
        "rack": rack.name,
        "command": command.summary(),
        "outcome": outcome,
        "killswitch": (row.stats or {}).get("ctrl"),
    }
